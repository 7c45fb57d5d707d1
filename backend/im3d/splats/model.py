"""The Gaussian model: parameters, activations and initialisation.

Parameters live in a `torch.nn.ParameterDict` with gsplat's simple_trainer names, so
`gsplat.strategy.DefaultStrategy` can densify and prune them on any device:

    means [N,3]    quats [N,4] (wxyz, unnormalised)    scales [N,3] (log)
    opacities [N] (logit)    sh0 [N,1,3]    shN [N,K,3], K = (degree+1)^2 - 1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from im3d.cameras import Cameras, project_points

SH_C0 = 0.28209479177387814  # Y_0^0: rgb = 0.5 + SH_C0 * sh0


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    return sh0 * SH_C0 + 0.5


def num_sh_rest(sh_degree: int) -> int:
    return (sh_degree + 1) ** 2 - 1


def make_splats(
    means: Tensor,  # [N, 3]
    rgbs: Tensor,  # [N, 3] in [0, 1]
    scale: Tensor | float,  # [N] or a scalar, linear
    opacity: float = 0.1,
    sh_degree: int = 0,
) -> torch.nn.ParameterDict:
    N = means.shape[0]
    assert means.shape == (N, 3), means.shape
    assert rgbs.shape == (N, 3), rgbs.shape
    scales = torch.as_tensor(scale, dtype=means.dtype, device=means.device).expand(N).clamp_min(1e-6)
    quats = torch.zeros(N, 4, dtype=means.dtype, device=means.device)
    quats[:, 0] = 1.0
    return torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter(means.clone()),
            "quats": torch.nn.Parameter(quats),
            "scales": torch.nn.Parameter(scales.log()[:, None].repeat(1, 3)),
            "opacities": torch.nn.Parameter(torch.logit(torch.full((N,), opacity, dtype=means.dtype, device=means.device))),
            "sh0": torch.nn.Parameter(rgb_to_sh0(rgbs)[:, None, :].clone()),
            "shN": torch.nn.Parameter(torch.zeros(N, num_sh_rest(sh_degree), 3, dtype=means.dtype, device=means.device)),
        }
    )


def activated(splats: torch.nn.ParameterDict | dict[str, Tensor]) -> dict[str, Tensor]:
    """Parameters -> what the rasterizer takes: linear scales, opacities in [0,1], SH [N,K,3]."""
    return {
        "means": splats["means"],
        "quats": splats["quats"],
        "scales": torch.exp(splats["scales"]),
        "opacities": torch.sigmoid(splats["opacities"]),
        "colors": torch.cat([splats["sh0"], splats["shN"]], dim=1),
    }


def sh_degree_of(splats: torch.nn.ParameterDict | dict[str, Tensor]) -> int:
    return int(round(math.sqrt(splats["shN"].shape[1] + 1))) - 1


def scene_bounds(cameras: Cameras) -> tuple[Tensor, float]:
    """Centre the cameras look at (least squares over their optical axes) and the camera-orbit radius."""
    c2w = torch.linalg.inv(cameras.viewmats.double())
    origins, dirs = c2w[:, :3, 3], c2w[:, :3, 2]  # OpenCV: +z looks forward
    # Minimise sum of squared distances to the lines: (sum (I - d d^T)) c = sum (I - d d^T) o.
    eye = torch.eye(3, dtype=torch.float64)
    projectors = eye - dirs[:, :, None] * dirs[:, None, :]
    A, b = projectors.sum(0), torch.einsum("cij,cj->i", projectors, origins)
    if len(cameras) < 2 or torch.linalg.matrix_rank(A) < 3:
        center = torch.zeros(3, dtype=torch.float64)
    else:
        center = torch.linalg.solve(A, b)
    radius = float((origins - center).norm(dim=-1).max())
    return center.float(), radius


def init_center(num_points: int, radius: float, scale: float, sh_degree: int, center: Tensor, generator: torch.Generator) -> torch.nn.ParameterDict:
    """The paper's initialisation: points uniformly in a small ball at the scene centre, grey."""
    direction = torch.randn(num_points, 3, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    r = radius * torch.rand(num_points, 1, generator=generator) ** (1.0 / 3.0)
    means = center[None, :] + direction * r
    return make_splats(means, torch.full((num_points, 3), 0.5), scale, sh_degree=sh_degree)


def init_visual_hull(
    num_points: int,
    cameras: Cameras,
    images: Tensor,  # [C, H, W, 3]
    masks: Tensor,  # [C, H, W, 1]
    scale: float,
    sh_degree: int,
    generator: torch.Generator,
    search_radius: float,
    center: Tensor,
    grid: int = 64,
) -> torch.nn.ParameterDict | None:
    """Points sampled inside the visual hull of the masks, coloured by the mean of the views seeing them.

    Returns None when the hull is empty or degenerate (no masks, too few views), so the caller can
    fall back to the centre initialisation.
    """
    C, H, W, _ = images.shape
    assert masks.shape == (C, H, W, 1), masks.shape
    if C < 3 or bool((masks > 0.5).all()) or not bool((masks > 0.5).any()):
        return None
    axis = torch.linspace(-search_radius, search_radius, grid)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + center[None]
    pix, depth = project_points(xyz, cameras.viewmats, cameras.Ks)  # [C, P, 2], [C, P]
    u, v = pix[..., 0], pix[..., 1]
    in_frame = (u >= 0) & (u < W) & (v >= 0) & (v < H) & (depth > 0)
    ui, vi = u.long().clamp(0, W - 1), v.long().clamp(0, H - 1)
    cam_idx = torch.arange(C)[:, None].expand_as(ui)
    inside = masks[cam_idx, vi, ui, 0] > 0.5  # [C, P]
    # Carve: a point survives when every view that sees it has it inside its mask.
    keep = (inside | ~in_frame).all(dim=0) & (in_frame.sum(dim=0) >= 2)
    if int(keep.sum()) < 8:
        return None
    # Keep a shell: points with a carved neighbour, where the surface is (interior points never show).
    occupancy = keep.view(grid, grid, grid).float()[None, None]
    eroded = -torch.nn.functional.max_pool3d(-occupancy, 3, stride=1, padding=1)
    shell = (occupancy - eroded).view(-1) > 0
    candidates = torch.nonzero(keep & shell).squeeze(-1)
    if candidates.numel() < 8:
        candidates = torch.nonzero(keep).squeeze(-1)
    choice = candidates[torch.randint(candidates.numel(), (num_points,), generator=generator)]
    cell = 2 * search_radius / (grid - 1)
    means = xyz[choice] + (torch.rand(num_points, 3, generator=generator) - 0.5) * cell
    colors = images[cam_idx[:, choice], vi[:, choice], ui[:, choice]]  # [C, n, 3]
    seen = (in_frame[:, choice] & inside[:, choice]).float()[..., None]
    rgb = (colors * seen).sum(0) / seen.sum(0).clamp_min(1)
    # Neighbours on the shell (about `spacing` apart) must overlap or the first renders are speckle
    # that the fit has to grow out of: at least a third of the spacing (3 sigma apart).
    spacing = cell * math.sqrt(candidates.numel() / num_points)
    return make_splats(means, rgb.clamp(0.02, 0.98), max(scale, 0.5 * cell, spacing / 3), sh_degree=sh_degree)
