"""Fast CPU compositing: numba tile rasterizer with a hand-written backward pass.

The same algorithm as gsplat's CUDA kernels (`RasterizeToPixels3DGSFwd/Bwd.cu`), with tiles
shared out among CPU threads instead of CUDA blocks:

1. binning (vectorised torch): each visible Gaussian is listed in every 16x16 tile its
   3-sigma box overlaps, per tile in depth order (one sort by (camera, tile, depth));
2. forward: per pixel, front-to-back compositing over the tile's list; stores the final
   transmittance and how many list entries the pixel walked;
3. backward: per pixel, back-to-front over the walked entries, recovering the transmittance
   at each Gaussian by dividing out ``1 - alpha``, which gives the gradients w.r.t. 2D means,
   conics, colours (incl. the depth channel of RGB+ED) and opacities.

Gradients are accumulated per (tile, Gaussian) list entry, so tiles never write to the same
memory, then summed per Gaussian. Arithmetic is float64 inside the kernels; tensors in and
out are float32 (float64 inputs are rendered in float32 and cast back).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit
from torch import Tensor

from im3d.splats.raster.common import ALPHA_THRESHOLD, MAX_ALPHA, TILE_SIZE, TRANSMITTANCE_THRESHOLD, ProjectedSplats

# Gradient slots of one list entry: d/d(mean x, mean y, conic a, b, c, opacity), then colours.
_V_FIXED = 6


def bin_tiles(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N, 2] int32, 0 where culled
    depths: Tensor,  # [C, N]
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tile, depth-sorted lists of the Gaussians whose 3-sigma box overlaps the tile.

    Returns ``offsets [C * n_tiles + 1]`` (list of tile ``t`` of camera ``c`` is entries
    ``offsets[c * n_tiles + t] : offsets[c * n_tiles + t + 1]``), ``gaussian_ids [n_entries]``
    and ``camera_ids [n_entries]``.
    """
    C, N = depths.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    xy = means2d.detach().double()
    r = radii.double()
    tile_min = torch.floor((xy - r) / tile_size).long().clamp(min=0)
    tile_max = torch.floor((xy + r) / tile_size).long() + 1
    tile_max[..., 0].clamp_(max=tiles_x)
    tile_max[..., 1].clamp_(max=tiles_y)
    span = (tile_max - tile_min).clamp(min=0) * (radii > 0).all(dim=-1, keepdim=True)  # [C, N, 2]
    n_hits = (span[..., 0] * span[..., 1]).reshape(-1)  # [C * N]
    flat = torch.repeat_interleave(torch.arange(C * N), n_hits)  # (camera, Gaussian) of each entry
    first = torch.cumsum(n_hits, 0) - n_hits
    i = torch.arange(len(flat)) - first[flat]  # index of the entry among its Gaussian's tiles
    cams, gauss = flat // N, flat % N
    span_x = span[cams, gauss, 0]
    tiles = (tile_min[cams, gauss, 1] + i // span_x) * tiles_x + tile_min[cams, gauss, 0] + i % span_x
    depth_rank = torch.empty(C, N, dtype=torch.long)
    depth_rank.scatter_(1, torch.sort(depths.detach(), dim=1, stable=True).indices, torch.arange(N).expand(C, N).contiguous())
    bins = cams * n_tiles + tiles
    order = torch.sort(bins * N + depth_rank[cams, gauss]).indices
    offsets = torch.zeros(C * n_tiles + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(bins, minlength=C * n_tiles), 0)
    return offsets, gauss[order].to(torch.int32), cams[order]


# Kernels are serial, release the GIL, and each call handles every `stride`-th tile from
# `first` on; `run_on_threads` runs one call per CPU thread. (Numba's own `parallel=True` +
# `prange` compiles two to three times slower, and the first call's compile counts against
# every fresh checkout's test run.)


def run_on_threads(kernel, n_jobs: int, *args) -> None:
    """Call ``kernel(first, stride, *args)`` once per thread (`num_threads`), ``first = 0..stride-1``."""
    n_threads = max(1, min(num_threads(), n_jobs))
    if n_threads == 1:
        kernel(0, 1, *args)
        return
    with ThreadPoolExecutor(n_threads) as pool:
        for future in [pool.submit(kernel, first, n_threads, *args) for first in range(n_threads)]:
            future.result()


def num_threads() -> int:
    """Threads the CPU kernels run on: torch's intra-op thread count (``torch.set_num_threads``)."""
    return torch.get_num_threads()


@njit(nogil=True, cache=True, fastmath=False)
def _gather_tile(means2d, conics, colors, opacities, c, gaussian_ids, start, end):  # pragma: no cover
    """The tile's Gaussians as contiguous float64 arrays, front to back."""
    M, D = end - start, colors.shape[2]
    splats = np.empty((M, 7))  # mean x, mean y, conic a, b, c, opacity, sigma cut-off
    rgb = np.empty((M, D))
    for k in range(M):
        g = gaussian_ids[start + k]
        splats[k, 0], splats[k, 1] = means2d[c, g, 0], means2d[c, g, 1]
        splats[k, 2], splats[k, 3], splats[k, 4] = conics[c, g, 0], conics[c, g, 1], conics[c, g, 2]
        splats[k, 5] = opacities[c, g]
        # alpha < 1/255 exactly when sigma > ln(255 opacity): skip those pairs before exp(),
        # with a margin so that the exact test below still decides at the boundary.
        splats[k, 6] = math.log(max(splats[k, 5], 1e-30) / ALPHA_THRESHOLD) + 1e-6
        for d in range(D):
            rgb[k, d] = colors[c, g, d]
    return splats, rgb


@njit(nogil=True, cache=True, fastmath=False)
def _forward_tile(
    splats, rgb, background, has_background, c, x0, y0, width, height, tile_size,
    out_colors, out_alphas, final_T, n_walked,
):  # pragma: no cover - compiled
    M, D = rgb.shape
    pix = np.empty(D)
    for y in range(y0, min(y0 + tile_size, height)):
        for x in range(x0, min(x0 + tile_size, width)):
            px, py = x + 0.5, y + 0.5
            T = 1.0
            walked = 0
            pix[:] = 0.0
            for k in range(M):
                dx, dy = splats[k, 0] - px, splats[k, 1] - py
                sigma = 0.5 * (splats[k, 2] * dx * dx + splats[k, 4] * dy * dy) + splats[k, 3] * dx * dy
                if sigma > splats[k, 6]:
                    continue
                alpha = min(MAX_ALPHA, splats[k, 5] * math.exp(-sigma))
                if sigma < 0.0 or alpha < ALPHA_THRESHOLD:
                    continue
                next_T = T * (1.0 - alpha)
                if next_T <= TRANSMITTANCE_THRESHOLD:  # done, without this Gaussian (as gsplat)
                    break
                w = alpha * T
                for d in range(D):
                    pix[d] += rgb[k, d] * w
                walked = k + 1
                T = next_T
            for d in range(D):
                if has_background:
                    pix[d] += T * background[d]
                out_colors[c, y, x, d] = pix[d]
            out_alphas[c, y, x] = 1.0 - T
            final_T[c, y, x] = T
            n_walked[c, y, x] = walked


@njit(nogil=True, cache=True, fastmath=False)
def _forward_tiles(
    first, stride, means2d, conics, colors, opacities, backgrounds, has_background,
    offsets, gaussian_ids, width, height, tile_size, tiles_x, tiles_y,
    out_colors, out_alphas, final_T, n_walked,
):  # pragma: no cover - compiled
    n_tiles = tiles_x * tiles_y
    for job in range(first, colors.shape[0] * n_tiles, stride):
        c, t = job // n_tiles, job % n_tiles
        splats, rgb = _gather_tile(means2d, conics, colors, opacities, c, gaussian_ids, offsets[job], offsets[job + 1])
        _forward_tile(
            splats, rgb, backgrounds[c], has_background, c, (t % tiles_x) * tile_size, (t // tiles_x) * tile_size,
            width, height, tile_size, out_colors, out_alphas, final_T, n_walked,
        )  # fmt: skip


@njit(nogil=True, cache=True, fastmath=False)
def _backward_tile(
    splats, rgb, background, has_background, c, x0, y0, width, height, tile_size,
    final_T, n_walked, v_out_colors, v_out_alphas,
):  # pragma: no cover - compiled
    """Gradients w.r.t. each list entry: mean x, y, conic a, b, c, opacity, then colours."""
    M, D = rgb.shape
    v_local = np.zeros((M, _V_FIXED + D))
    v_pix = np.empty(D)
    behind = np.empty(D)  # colour accumulated behind the current Gaussian
    for y in range(y0, min(y0 + tile_size, height)):
        for x in range(x0, min(x0 + tile_size, width)):
            walked = n_walked[c, y, x]
            if walked == 0:
                continue
            px, py = x + 0.5, y + 0.5
            T_end = final_T[c, y, x]
            T = T_end
            v_alpha_out = np.float64(v_out_alphas[c, y, x])
            v_bg_dot = 0.0
            for d in range(D):
                v_pix[d] = v_out_colors[c, y, x, d]
                behind[d] = 0.0
                if has_background:
                    v_bg_dot += background[d] * v_pix[d]
            for k in range(walked - 1, -1, -1):
                ca, cb, cc, op = splats[k, 2], splats[k, 3], splats[k, 4], splats[k, 5]
                dx, dy = splats[k, 0] - px, splats[k, 1] - py
                sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                if sigma > splats[k, 6]:
                    continue
                vis = math.exp(-sigma)
                alpha = min(MAX_ALPHA, op * vis)
                if sigma < 0.0 or alpha < ALPHA_THRESHOLD:
                    continue
                ra = 1.0 / (1.0 - alpha)
                T *= ra  # transmittance in front of Gaussian k
                weight = alpha * T
                v_alpha = 0.0
                for d in range(D):
                    v_local[k, _V_FIXED + d] += weight * v_pix[d]
                    v_alpha += (rgb[k, d] * T - behind[d] * ra) * v_pix[d]
                    behind[d] += rgb[k, d] * weight
                # The final transmittance (alpha output, background weight) holds 1 - alpha_k.
                v_alpha += T_end * ra * (v_alpha_out - v_bg_dot)
                if op * vis <= MAX_ALPHA:  # alpha not clamped: it depends on sigma and opacity
                    v_sigma = -op * vis * v_alpha
                    v_local[k, 0] += v_sigma * (ca * dx + cb * dy)
                    v_local[k, 1] += v_sigma * (cb * dx + cc * dy)
                    v_local[k, 2] += 0.5 * v_sigma * dx * dx
                    v_local[k, 3] += v_sigma * dx * dy
                    v_local[k, 4] += 0.5 * v_sigma * dy * dy
                    v_local[k, 5] += vis * v_alpha
    return v_local


@njit(nogil=True, cache=True, fastmath=False)
def _backward_tiles(
    first, stride, means2d, conics, colors, opacities, backgrounds, has_background,
    offsets, gaussian_ids, width, height, tile_size, tiles_x, tiles_y,
    final_T, n_walked, v_out_colors, v_out_alphas, v_entries,
):  # pragma: no cover - compiled
    n_tiles = tiles_x * tiles_y
    for job in range(first, colors.shape[0] * n_tiles, stride):
        c, t = job // n_tiles, job % n_tiles
        start, end = offsets[job], offsets[job + 1]
        if start == end:
            continue
        splats, rgb = _gather_tile(means2d, conics, colors, opacities, c, gaussian_ids, start, end)
        v_entries[start:end] = _backward_tile(
            splats, rgb, backgrounds[c], has_background, c, (t % tiles_x) * tile_size, (t // tiles_x) * tile_size,
            width, height, tile_size, final_T, n_walked, v_out_colors, v_out_alphas,
        )  # fmt: skip


def _numpy32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy())


class _CompositeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, radii, depths, width, height):
        C, N, D = colors.shape
        tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
        arrays = dict(
            means2d=_numpy32(means2d),
            conics=_numpy32(conics),
            colors=_numpy32(colors),
            opacities=_numpy32(opacities),
            backgrounds=_numpy32(backgrounds) if backgrounds is not None else np.zeros((C, D), np.float32),
        )
        offsets, gaussian_ids, camera_ids = bin_tiles(means2d.cpu(), radii.cpu(), depths.cpu(), width, height)
        layout = (offsets.numpy(), gaussian_ids.numpy(), width, height, TILE_SIZE, tiles_x, tiles_y)
        has_background = backgrounds is not None
        out_colors = np.zeros((C, height, width, D), dtype=np.float32)
        out_alphas = np.zeros((C, height, width), dtype=np.float32)
        final_T = np.ones((C, height, width), dtype=np.float64)
        n_walked = np.zeros((C, height, width), dtype=np.int32)
        run_on_threads(
            _forward_tiles, C * tiles_x * tiles_y, arrays["means2d"], arrays["conics"], arrays["colors"],
            arrays["opacities"], arrays["backgrounds"], has_background, *layout,
            out_colors, out_alphas, final_T, n_walked,
        )  # fmt: skip
        ctx.kernel_inputs = (arrays, has_background, layout, final_T, n_walked)
        ctx.entry_slots = camera_ids * N + gaussian_ids  # row of each list entry in [C * N]
        ctx.shapes = (C, N, D)
        dtype = colors.dtype
        return (
            torch.from_numpy(out_colors).to(device=colors.device, dtype=dtype),
            torch.from_numpy(out_alphas).to(device=colors.device, dtype=dtype)[..., None],
        )

    @staticmethod
    def backward(ctx, v_render_colors, v_render_alphas):
        arrays, has_background, layout, final_T, n_walked = ctx.kernel_inputs
        C, N, D = ctx.shapes
        height, width = final_T.shape[1:]
        if v_render_colors is None:
            v_render_colors = torch.zeros(C, height, width, D)
        if v_render_alphas is None:
            v_render_alphas = torch.zeros(C, height, width, 1)
        v_out_colors = _numpy32(v_render_colors)
        v_out_alphas = _numpy32(v_render_alphas[..., 0])
        v_entries = np.zeros((len(layout[1]), _V_FIXED + D), dtype=np.float64)
        run_on_threads(
            _backward_tiles, C * layout[5] * layout[6], arrays["means2d"], arrays["conics"], arrays["colors"],
            arrays["opacities"], arrays["backgrounds"], has_background, *layout,
            final_T, n_walked, v_out_colors, v_out_alphas, v_entries,
        )  # fmt: skip
        v_entries = torch.from_numpy(v_entries)
        v_gauss = torch.zeros(C * N, v_entries.shape[1], dtype=torch.float64)
        v_gauss = v_gauss.index_add_(0, ctx.entry_slots, v_entries).reshape(C, N, -1)
        ref = v_render_colors
        cast = lambda t: t.to(device=ref.device, dtype=ref.dtype)  # noqa: E731
        v_means2d = cast(v_gauss[..., 0:2])
        v_conics = cast(v_gauss[..., 2:5])
        v_opacities = cast(v_gauss[..., 5])
        v_colors = cast(v_gauss[..., _V_FIXED:])
        v_backgrounds = None
        if has_background and ctx.needs_input_grad[4]:
            # d(colour)/d(background) is the final transmittance.
            T = torch.from_numpy(final_T)[..., None]
            v_backgrounds = cast((T * v_render_colors.detach().to(torch.float64).cpu()).sum(dim=(1, 2)))
        return v_means2d, v_conics, v_colors, v_opacities, v_backgrounds, None, None, None, None


def composite_cpu(
    splats: ProjectedSplats, width: int, height: int, backgrounds: Tensor | None = None  # [C, D]
) -> tuple[Tensor, Tensor]:  # colors [C, H, W, D], alphas [C, H, W, 1]
    splats.checked_shape()
    means2d, conics, colors, opacities, radii, depths = splats
    return _CompositeCPU.apply(means2d, conics, colors, opacities, backgrounds, radii, depths, int(width), int(height))
