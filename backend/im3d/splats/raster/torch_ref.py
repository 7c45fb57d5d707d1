"""Plain-PyTorch compositing: the reference backend (autograd, any device, MPS included).

Every pixel evaluates every Gaussian whose 3-sigma box overlaps its tile (the box is exact:
outside it alpha < 1/255, see `project.project_gaussians`), in depth order, with gsplat's rules:
``alpha = min(0.999, opacity * exp(-sigma))``, skipped when ``sigma < 0`` or ``alpha < 1/255``,
and the pixel stops before the Gaussian that would bring its transmittance to 1e-4 or below.
Tiles only bound memory; a crowded tile's compositing is checkpointed, so the backward pass
recomputes it instead of holding every pixel-Gaussian pair of every view in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from im3d.splats.raster.common import ALPHA_THRESHOLD, MAX_ALPHA, TILE_SIZE, TRANSMITTANCE_THRESHOLD, ProjectedSplats

# Tiles with more pixel-Gaussian pairs than this are recomputed in the backward pass rather
# than stored (checkpointing a tiny tile costs more than it saves, and the first use of
# torch.utils.checkpoint in a process takes seconds).
CHECKPOINT_MIN_PAIRS = 1 << 16


def composite_pixels(
    pixels: Tensor,  # [P, 2] pixel centres
    means2d: Tensor,  # [M, 2] depth-sorted, front first
    conics: Tensor,  # [M, 3]
    colors: Tensor,  # [M, D]
    opacities: Tensor,  # [M]
) -> tuple[Tensor, Tensor]:  # colors [P, D], final transmittance [P]
    delta = means2d[None, :, :] - pixels[:, None, :]  # [P, M, 2]
    dx, dy = delta.unbind(-1)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy  # [P, M]
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), MAX_ALPHA)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    # Transmittance is non-increasing along the ray, so "not yet done" is a prefix.
    keep = torch.cumprod(1.0 - alpha, dim=1) > TRANSMITTANCE_THRESHOLD
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    one_minus = 1.0 - alpha
    transmittance = torch.cumprod(one_minus, dim=1)  # inclusive
    before = torch.cat([torch.ones_like(transmittance[:, :1]), transmittance[:, :-1]], dim=1)
    weights = alpha * before  # [P, M]
    return weights @ colors, transmittance[:, -1]


def composite_torch(
    splats: ProjectedSplats,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,  # [C, D]
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor]:  # colors [C, H, W, D], alphas [C, H, W, 1]
    C, N, D = splats.checked_shape()
    means2d, conics, colors, opacities, radii, depths = splats
    dtype, device = means2d.dtype, means2d.device
    use_checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means2d, conics, colors, opacities)
    )

    images, alphas = [], []
    for cam in range(C):
        ids = torch.nonzero((radii[cam] > 0).all(dim=-1)).squeeze(-1)
        ids = ids[torch.sort(depths[cam, ids].detach(), stable=True).indices]  # front to back
        xy = means2d[cam, ids].detach()
        r = radii[cam, ids].to(dtype)
        box_min, box_max = xy - r, xy + r  # [M, 2]
        rows, row_alphas = [], []
        for y0 in range(0, height, tile_size):
            y1 = min(y0 + tile_size, height)
            tiles, tile_alphas = [], []
            for x0 in range(0, width, tile_size):
                x1 = min(x0 + tile_size, width)
                hit = (box_max[:, 0] > x0) & (box_min[:, 0] < x1) & (box_max[:, 1] > y0) & (box_min[:, 1] < y1)
                g = ids[hit]
                if len(g) == 0:
                    tile_rgb = colors.new_zeros(y1 - y0, x1 - x0, D)
                    tile_t = colors.new_ones(y1 - y0, x1 - x0)
                else:
                    ys, xs = torch.meshgrid(
                        torch.arange(y0, y1, dtype=dtype, device=device),
                        torch.arange(x0, x1, dtype=dtype, device=device),
                        indexing="ij",
                    )
                    pixels = torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5
                    args = (pixels, means2d[cam, g], conics[cam, g], colors[cam, g], opacities[cam, g])
                    if use_checkpoint and len(pixels) * len(g) >= CHECKPOINT_MIN_PAIRS:
                        tile_rgb, tile_t = checkpoint(composite_pixels, *args, use_reentrant=False, preserve_rng_state=False)
                    else:
                        tile_rgb, tile_t = composite_pixels(*args)
                    tile_rgb = tile_rgb.reshape(y1 - y0, x1 - x0, D)
                    tile_t = tile_t.reshape(y1 - y0, x1 - x0)
                if backgrounds is not None:
                    tile_rgb = tile_rgb + tile_t[..., None] * backgrounds[cam]
                tiles.append(tile_rgb)
                tile_alphas.append(1.0 - tile_t)
            rows.append(torch.cat(tiles, dim=1))
            row_alphas.append(torch.cat(tile_alphas, dim=1))
        images.append(torch.cat(rows, dim=0))
        alphas.append(torch.cat(row_alphas, dim=0))
    return torch.stack(images), torch.stack(alphas)[..., None]
