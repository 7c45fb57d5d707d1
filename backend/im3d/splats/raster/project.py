"""Projection and view-dependent colour, shared by the ``"cpu"`` and ``"torch"`` backends.

Follows gsplat's CUDA kernels (`ProjectionEWA3DGSFused.cu`, `Utils.cuh`): EWA splatting with the
`eps2d` low-pass filter, culling outside [near_plane, far_plane], opacity-aware 3-sigma radii
(``min(3.33, sqrt(2 ln(255 opacity)))`` standard deviations) and off-screen culling. Everything
here is plain torch and differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from im3d.splats.raster.common import ALPHA_THRESHOLD, MAX_EXTEND


def quat_to_rotmat(quats: Tensor) -> Tensor:  # [..., 4] wxyz, any length -> [..., 3, 3]
    """Rotation matrices of (normalised) wxyz quaternions."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )  # fmt: skip
    return R.reshape(quats.shape[:-1] + (3, 3))


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:  # [..., 4], [..., 3] -> [..., 3, 3]
    """World-space covariances ``R S S^T R^T`` of Gaussians with rotation `quats`, linear `scales`."""
    M = quat_to_rotmat(quats) * scales[..., None, :]  # R @ diag(scales)
    return M @ M.transpose(-1, -2)


def sh_bases(degree: int, dirs: Tensor) -> Tensor:  # [..., 3] unit vectors -> [..., (degree + 1)^2]
    """Real spherical-harmonics bases up to `degree` (0..4) in the 3DGS / gsplat order and signs.

    Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013; the same constants as gsplat's
    kernels, so that splats fitted here render the same in gsplat and other 3DGS viewers.
    """
    if not 0 <= degree <= 4:
        raise ValueError(f"SH degree must be 0..4, got {degree}")
    x, y, z = dirs.unbind(-1)
    b = [torch.full_like(x, 0.2820947917738781)]
    if degree >= 1:
        b += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2 = z * z
        c1, s1 = x * x - y * y, 2 * x * y
        t = -1.092548430592079 * z
        b += [0.5462742152960395 * s1, t * y, 0.9461746957575601 * z2 - 0.3153915652525201, t * x, 0.5462742152960395 * c1]
    if degree >= 3:
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        tc = -2.285228997322329 * z2 + 0.4570457994644658
        tb = 1.445305721320277 * z
        ta = -0.5900435899266435
        b += [ta * s2, tb * s1, tc * y, z * (1.865881662950577 * z2 - 1.119528997770346), tc * x, tb * c1, ta * c2]
    if degree >= 4:
        c3, s3 = x * c2 - y * s2, x * s2 + y * c2
        td = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tc = 3.31161143515146 * z2 - 0.47308734787878
        tb = -1.770130769779931 * z
        ta = 0.6258357354491763
        b20 = 1.984313483298443 * z2 * (1.865881662950577 * z2 - 1.119528997770346) - 1.006230589874905 * (
            0.9461746957575601 * z2 - 0.3153915652525201
        )
        b += [ta * s3, tb * s2, tc * s1, td * y, b20, td * x, tc * c1, tb * c2, ta * c3]
    return torch.stack(b, dim=-1)


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
    covars = quat_scale_to_covar(quats, scales)  # [N, 3, 3]
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
    bases = sh_bases(sh_degree, dirs)  # [C, N, n_bases]
    # Per Gaussian, [C, n_bases] @ [n_bases, 3]: no [C, N, K, 3] intermediate (gsplat's torch
    # `_spherical_harmonics` broadcasts one, which dominates a CPU step at SH degree 3).
    rgb = torch.bmm(bases.transpose(0, 1), colors[:, :n_bases, :]).transpose(0, 1)  # [C, N, 3]
    return torch.clamp_min(rgb + 0.5, 0.0)
