"""The rasterizer's front end: one signature, three backends (DESIGN §5).

`rasterize()` mirrors `gsplat.rasterization(..., packed=False)`: same arguments, same outputs,
same `info` keys, so the fitting loop and `gsplat.strategy.DefaultStrategy` work unchanged on
every device. It checks the inputs, picks a backend (`pick_backend`) and, for the two backends
of our own, projects (`project.py`) and then composites:

- ``"gsplat"``: `gsplat.rasterization` on CUDA tensors (`cuda_gsplat.py`), projection included;
- ``"cpu"``: a compiled numba tile rasterizer with a hand-written backward pass (`cpu.py`);
- ``"torch"``: plain-PyTorch compositing with autograd on any device, MPS included
  (`torch_ref.py`); the oracle the others are tested against.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from im3d.splats.raster.common import TILE_SIZE, ProjectedSplats, RasterizerError
from im3d.splats.raster.cpu import composite_cpu
from im3d.splats.raster.cuda_gsplat import rasterize_gsplat
from im3d.splats.raster.project import project_gaussians, view_colors
from im3d.splats.raster.torch_ref import composite_torch

BackendName = Literal["auto", "torch", "cpu", "gsplat"]
BACKENDS = ("auto", "torch", "cpu", "gsplat")
RENDER_MODES = ("RGB", "RGB+ED")


def pick_backend(device: torch.device | str, requested: str = "auto") -> str:
    """The backend that `rasterize` uses for tensors on `device`.

    ``"auto"`` picks ``"gsplat"`` for CUDA tensors, ``"cpu"`` for CPU tensors and ``"torch"``
    for anything else (MPS, ...). An explicit request is checked against the device.
    """
    device = torch.device(device)
    if requested not in BACKENDS:
        raise RasterizerError(f"unknown rasterizer backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    # Check CUDA before anything imports gsplat: on a CPU machine with nvcc installed gsplat
    # would try to JIT-compile its extension and fail confusingly.
    is_cuda = device.type == "cuda" and torch.cuda.is_available()
    if requested == "auto":
        if is_cuda:
            return "gsplat"
        return "cpu" if device.type == "cpu" else "torch"
    if requested == "gsplat" and not is_cuda:
        raise RasterizerError(
            f"backend='gsplat' needs CUDA tensors, but the splats are on {device}"
            + ("" if torch.cuda.is_available() else " and CUDA is not available on this machine")
            + "; use backend='auto' (picks 'cpu' on CPU, 'torch' elsewhere) or move the tensors to CUDA"
        )
    if requested == "cpu" and device.type != "cpu":
        raise RasterizerError(
            f"backend='cpu' needs CPU tensors, but the splats are on {device}; "
            "use backend='auto' or 'torch', or move the tensors with .cpu()"
        )
    return requested


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, render_mode):
    def fail(msg: str):
        raise RasterizerError(msg)

    if means.ndim != 2 or means.shape[-1] != 3:
        fail(f"means must be [N, 3], got {tuple(means.shape)}")
    N = means.shape[0]
    if quats.shape != (N, 4):
        fail(f"quats must be [N, 4] = [{N}, 4] (wxyz), got {tuple(quats.shape)}")
    if scales.shape != (N, 3):
        fail(f"scales must be [N, 3] = [{N}, 3] (linear, not log), got {tuple(scales.shape)}")
    if opacities.shape != (N,):
        fail(f"opacities must be [N] = [{N}] (in [0, 1], not logits), got {tuple(opacities.shape)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        fail(f"viewmats must be [C, 4, 4], got {tuple(viewmats.shape)}")
    C = viewmats.shape[0]
    if Ks.shape != (C, 3, 3):
        fail(f"Ks must be [C, 3, 3] = [{C}, 3, 3] like viewmats, got {tuple(Ks.shape)}")
    if sh_degree is None:
        if colors.ndim != 2 or colors.shape[0] != N:
            fail(f"colors must be [N, D] = [{N}, D] when sh_degree is None, got {tuple(colors.shape)}")
    else:
        if colors.ndim != 3 or colors.shape[0] != N or colors.shape[-1] != 3:
            fail(f"colors must be SH coefficients [N, K, 3] = [{N}, K, 3] with sh_degree, got {tuple(colors.shape)}")
        if not 0 <= sh_degree <= 4 or (sh_degree + 1) ** 2 > colors.shape[1]:
            fail(f"sh_degree={sh_degree} needs 0..4 and (sh_degree+1)^2 <= K={colors.shape[1]} coefficients")
    if int(width) <= 0 or int(height) <= 0:
        fail(f"width and height must be positive, got {width}x{height}")
    if render_mode not in RENDER_MODES:
        fail(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    D = 3 if sh_degree is not None else colors.shape[-1]
    if backgrounds is not None and backgrounds.shape != (C, D):
        fail(f"backgrounds must be [C, {D}] = [{C}, {D}], got {tuple(backgrounds.shape)}")
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors, "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        fail(f"all tensors must be on one device, got {devices}")


def rasterize(
    means: Tensor,  # [N, 3] world positions
    quats: Tensor,  # [N, 4] wxyz, not necessarily normalised
    scales: Tensor,  # [N, 3] activated (linear) scales
    opacities: Tensor,  # [N] activated, in [0, 1]
    colors: Tensor,  # [N, K, 3] SH coefficients (with sh_degree) or [N, 3] RGB (sh_degree=None)
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV axes
    Ks: Tensor,  # [C, 3, 3] pixel intrinsics, pixel centres at +0.5
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, 3]
    render_mode: Literal["RGB", "RGB+ED"] = "RGB",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    backend: BackendName = "auto",
) -> tuple[Tensor, Tensor, dict]:
    """Render Gaussians into C images: ``colors [C, H, W, 3|4]``, ``alphas [C, H, W, 1]``, ``info``.

    ``render_mode="RGB+ED"`` appends the expected depth (alpha-normalised) as a 4th channel.
    ``info`` holds gsplat's non-packed meta (``means2d [C, N, 2]`` in the autograd graph, ``radii
    [C, N, 2] int32``, ``depths``, ``conics``, ``width``, ``height``, ``n_cameras``,
    ``gaussian_ids=None``, ...) so `gsplat.strategy.DefaultStrategy` can densify on any backend.
    """
    width, height = int(width), int(height)
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, render_mode)
    chosen = pick_backend(means.device, backend)
    if chosen == "gsplat":
        return rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        )  # fmt: skip
    composite = composite_cpu if chosen == "cpu" else composite_torch

    C, N = viewmats.shape[0], means.shape[0]
    # 1. Project to the image planes (shared, autograd).
    radii, means2d, depths, conics = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d
    )
    # 2. Per-view colours (SH towards each camera), plus depth for expected-depth rendering.
    view_rgb = view_colors(means, colors, viewmats, sh_degree)  # [C, N, D]
    if render_mode == "RGB+ED":
        view_rgb = torch.cat([view_rgb, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    view_opacities = opacities[None, :].expand(C, N)  # [C, N]
    # 3. Front-to-back alpha compositing.
    projected = ProjectedSplats(means2d, conics, view_rgb, view_opacities, radii, depths)
    render_colors, render_alphas = composite(projected, width, height, backgrounds)
    if render_mode == "RGB+ED":
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    info = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": view_opacities,
        "width": width,
        "height": height,
        "tile_size": TILE_SIZE,
        "tile_width": math.ceil(width / TILE_SIZE),
        "tile_height": math.ceil(height / TILE_SIZE),
        "n_batches": 1,
        "n_cameras": C,
        "backend": chosen,
    }
    return render_colors, render_alphas, info
