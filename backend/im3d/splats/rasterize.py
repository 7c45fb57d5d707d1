"""One rasterizer signature, three backends (DESIGN §5).

`rasterize()` mirrors `gsplat.rasterization(..., packed=False)`: same arguments, same outputs,
same `info` keys, so the fitting loop and `gsplat.strategy.DefaultStrategy` work unchanged on
every device. Backends:

- ``"gsplat"``: `gsplat.rasterization` on CUDA tensors (`raster_gsplat.py`);
- ``"cpu"``: torch projection + SH (autograd), then a compiled numba tile rasterizer with a
  hand-written backward pass (`raster_cpu.py`);
- ``"torch"``: torch projection + SH, then plain-PyTorch compositing with autograd on any
  device, MPS included (`raster_torch.py`); the oracle the others are tested against.

The projection and SH code here is shared by the ``"cpu"`` and ``"torch"`` backends and follows
gsplat's CUDA kernels (`ProjectionEWA3DGSFused.cu`, `Utils.cuh`): EWA splatting with the
`eps2d` low-pass filter, culling outside [near_plane, far_plane], opacity-aware 3-sigma radii
(``min(3.33, sqrt(2 ln(255 opacity)))`` standard deviations) and off-screen culling.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _eval_sh_bases_fast, _quat_scale_to_covar_preci
from torch import Tensor

BackendName = Literal["auto", "torch", "cpu", "gsplat"]
BACKENDS = ("auto", "torch", "cpu", "gsplat")
RENDER_MODES = ("RGB", "RGB+ED")

# Same constants as gsplat's kernels (Common.h, RasterizeToPixels3DGSFwd.cu).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_THRESHOLD = 1e-4
MAX_EXTEND = 3.33  # the radius in standard deviations for fully opaque Gaussians
TILE_SIZE = 16


class RasterizerError(ValueError):
    """Bad rasterizer input or an impossible backend request; the message says what to do."""


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


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, not necessarily normalised
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection as in gsplat's fused projection kernel, differentiable by autograd.

    Returns ``radii [C, N, 2] int32`` (0 where culled), ``means2d [C, N, 2]``, ``depths [C, N]``
    and ``conics [C, N, 3]`` (upper triangle of the inverse 2D covariance). Culled Gaussians get
    finite placeholder values so that masked-out branches never put NaNs into the gradients.
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)  # [N, 3, 3]
    # World to camera with plain matmuls (gsplat's torch `_world_to_cam`/`_persp_proj` use
    # einsums that are several times slower on CPU at 10k Gaussians x 16 views).
    R, t = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # [C, 1, 3, 3], [C, 1, 3]
    means_c = (R @ means[None, :, :, None])[..., 0] + t  # [C, N, 3]
    covars_c = R @ covars[None] @ R.transpose(-1, -2)  # [C, N, 3, 3]
    depths = means_c[..., 2]  # [C, N]
    in_depth_range = (depths >= near_plane) & (depths <= far_plane)  # [C, N]
    # Behind-the-camera points would divide by ~0: project a harmless stand-in instead.
    x, y, z = torch.where(in_depth_range[..., None], means_c, means_c.new_tensor([0.0, 0.0, 1.0])).unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [C, N, 2]
    # EWA Jacobian; as in gsplat, x/z and y/z are clamped to the frustum widened by 15% a side.
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    j00, j02 = fx / z, -fx * tx / (z * z)  # J = [[j00, 0, j02], [0, j11, j12]]
    j11, j12 = fy / z, -fy * ty / (z * z)
    s00, s01, s02 = covars_c[..., 0, 0], covars_c[..., 0, 1], covars_c[..., 0, 2]
    s11, s12, s22 = covars_c[..., 1, 1], covars_c[..., 1, 2], covars_c[..., 2, 2]
    cov00 = j00 * j00 * s00 + 2 * j00 * j02 * s02 + j02 * j02 * s22
    cov01 = j00 * j11 * s01 + j00 * j12 * s02 + j02 * j11 * s12 + j02 * j12 * s22
    cov11 = j11 * j11 * s11 + 2 * j11 * j12 * s12 + j12 * j12 * s22

    a = cov00 + eps2d
    b = cov01
    c = cov11 + eps2d
    det = a * c - b * b  # [C, N]
    valid = in_depth_range & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)  # [C, N, 3]

    with torch.no_grad():
        opacity = opacities.detach()[None, :].expand_as(det)  # [C, N]
        visible = valid & (opacity >= ALPHA_THRESHOLD)
        extend = torch.sqrt(2.0 * torch.log(opacity.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp(max=MAX_EXTEND)
        radius_x = torch.ceil(extend * torch.sqrt(a.detach().clamp(min=0.0)))
        radius_y = torch.ceil(extend * torch.sqrt(c.detach().clamp(min=0.0)))
        visible &= (radius_x > 0) | (radius_y > 0)
        mx, my = means2d.detach().unbind(-1)
        on_screen = (mx + radius_x > 0) & (mx - radius_x < width) & (my + radius_y > 0) & (my - radius_y < height)
        visible &= on_screen
        radii = torch.stack([radius_x, radius_y], dim=-1) * visible[..., None]
        radii = radii.to(torch.int32)  # [C, N, 2]
    return radii, means2d, depths, conics


def view_colors(
    means: Tensor,  # [N, 3]
    colors: Tensor,  # [N, K, 3] SH coefficients or [N, D] plain colours
    viewmats: Tensor,  # [C, 4, 4]
    sh_degree: int | None,
) -> Tensor:  # [C, N, 3 | D]
    """Per-view colours: SH evaluated towards each camera (+0.5, clamped at 0, as gsplat does)."""
    C, N = viewmats.shape[0], means.shape[0]
    if sh_degree is None:
        return colors[None].expand(C, N, colors.shape[-1])
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = F.normalize(means[None, :, :] - campos[:, None, :], dim=-1)  # [C, N, 3]
    n_bases = (sh_degree + 1) ** 2
    bases = _eval_sh_bases_fast(n_bases, dirs)  # [C, N, n_bases]
    # Per Gaussian, [C, n_bases] @ [n_bases, 3]: no [C, N, K, 3] intermediate (gsplat's torch
    # `_spherical_harmonics` broadcasts one, which dominates a CPU step at SH degree 3).
    rgb = torch.bmm(bases.transpose(0, 1), colors[:, :n_bases, :]).transpose(0, 1)  # [C, N, 3]
    return torch.clamp_min(rgb + 0.5, 0.0)


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
        from im3d.splats.raster_gsplat import rasterize_gsplat

        return rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        )  # fmt: skip
    if chosen == "cpu":
        from im3d.splats.raster_cpu import composite_cpu as composite
    else:
        from im3d.splats.raster_torch import composite_torch as composite

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
    render_colors, render_alphas = composite(
        means2d, conics, view_rgb, view_opacities, radii, depths, width, height, backgrounds
    )
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
