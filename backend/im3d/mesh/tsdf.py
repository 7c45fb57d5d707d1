"""Surface from rendered splat depth: depth maps fused into a truncated signed distance field.

    field, grid = fuse_splat_depth(splats, gaussians, resolution, views, ...)   # inside > 0
    vertices_ijk, faces = mcubes.marching_cubes(field, 0.0)

What an artist sees of splats is their rendering, so the surface is taken from it (as 2DGS and
Gaussian Opacity Fields do): the splats are rendered with their expected depth and alpha from the
fitted views and from extra views spread over the sphere around the object, and every depth map
is fused into a TSDF on a grid (KinectFusion-style running mean of the clamped signed distance,
numba kernels on a thread per core):

  - a voxel a view sees in front of the rendered surface gets a positive distance, one just
    behind it (within the truncation band) a negative one; beyond the band it is occluded and
    that view says nothing;
  - a voxel whose pixel is empty (alpha < 0.05) is free space in that view; a faint pixel
    (alpha < 0.5) says nothing, and in the fitted views the masks decide what is empty;
  - with the fitted views' masks (`carve=True`), a voxel outside any mask is free space outright
    (space carving): the silhouettes the splats were fitted to stay exact, thin legs included;
  - a voxel no view says anything about is inside (hidden interior), so surfaces close.

The iso-surface of the fused field at 0 is the rendered surface: no density threshold, no snap,
so it neither swells nor shrinks with the splats' size, and a 4 cm leg stays 4 cm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import torch
from scipy import ndimage

from im3d.cameras import Cameras, c2w_gl_to_viewmats, fov_to_focal, intrinsics_matrix, look_at_c2w_gl
from im3d.errors import check_cancel
from im3d.mesh.density import DensityGrid, GaussianArrays, grid_bounds
from im3d.mesh.errors import MeshingError
from im3d.splats.raster.common import TILE_SIZE
from im3d.splats.raster.cpu import bin_tiles, run_on_threads  # one thread per core, as the rasterizer
from im3d.splats.raster.project import project_gaussians

# Field of view of the extra views placed around the object (wide enough, little distortion).
EXTRA_FOV_DEG = 40.0
# Views rendered per rasterizer call: bounds memory, and cancel/progress are checked between chunks.
VIEWS_PER_CHUNK = 8
# A rendered pixel counts as covered (surface) at this alpha, and a mask pixel as object.
COVERED_ALPHA = 0.5
# A rendered pixel below this alpha is free space. Between the two it says nothing: fitted splats
# are often semi-transparent (thin legs become faint streaks), and calling those pixels empty
# would carve holes and cut legs off; the masks (space carving) decide there.
FREE_ALPHA = 0.05


@dataclass
class DepthViews:
    """Depth maps rendered from the splats: what the fusion consumes."""

    viewmats: np.ndarray  # [C, 4, 4] world-to-camera, OpenCV axes
    Ks: np.ndarray  # [C, 3, 3]
    depths: np.ndarray  # [C, H, W] float32 expected depth along the optical axis (camera z)
    alphas: np.ndarray  # [C, H, W] float32 rendered opacity


def sphere_cameras(
    count: int,
    center: np.ndarray,  # [3]
    radius: float,
    width: int,
    height: int,
    fov_deg: float = EXTRA_FOV_DEG,
) -> Cameras:
    """`count` cameras on a Fibonacci sphere around `center`, framing a sphere of `radius` (Z up).

    `fov_deg` is the field of view across the image's shorter side.
    """
    distance = radius / math.sin(math.radians(0.5 * fov_deg)) * 1.05
    focal = fov_to_focal(math.radians(fov_deg), min(width, height))
    K = intrinsics_matrix(focal, focal, 0.5 * width, 0.5 * height)
    golden = math.pi * (3.0 - math.sqrt(5.0))
    c2ws = []
    for i in range(count):
        z = 1.0 - 2.0 * (i + 0.5) / count
        r = math.sqrt(max(0.0, 1.0 - z * z))
        direction = np.array([r * math.cos(golden * i), r * math.sin(golden * i), z])
        # look_at needs an up vector that is not parallel to the view direction
        up = np.array([0.0, 0.0, 1.0]) if abs(z) < 0.99 else np.array([0.0, 1.0, 0.0])
        c2ws.append(look_at_c2w_gl(center + distance * direction, center, up))
    viewmats = c2w_gl_to_viewmats(torch.as_tensor(np.stack(c2ws), dtype=torch.float64)).float()
    Ks = torch.as_tensor(np.stack([K] * count), dtype=torch.float32)
    return Cameras(viewmats, Ks, width, height)


def render_depths(
    splats: dict,  # parameter dict of tensors (means, quats, log-scales, logit-opacities, sh0, shN)
    cameras: Cameras,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> DepthViews:
    """Median depth and alpha of the splats at `cameras`, where each ray actually meets each Gaussian.

    The rasterizers' expected depth ("RGB+ED") composites the Gaussians' *centre* depths. On a
    slanted surface the splats a ray meets first are those whose centres lie nearer the camera,
    so that depth sits in front of the surface by up to a splat radius. Here each Gaussian
    contributes the depth of its density maximum along the pixel's ray (as Gaussian Opacity
    Fields do), and the pixel's depth is where its transmittance falls below one half (median
    depth: a surface, not an average over layers). Same projection, tiles, alpha rules and
    front-to-back order as the CPU rasterizer (`raster.cpu.bin_tiles`), forward only.
    """
    means = splats["means"].detach().cpu().float()
    quats = splats["quats"].detach().cpu().float()
    scales = torch.exp(splats["scales"].detach().cpu().float())
    opacities = torch.sigmoid(splats["opacities"].detach().cpu().float())
    # World-space precision (inverse covariance) of each Gaussian, [N, 3, 3].
    q = torch.nn.functional.normalize(quats, dim=-1).double()
    from im3d.mesh.density import quats_to_rotations

    R = torch.from_numpy(quats_to_rotations(q.numpy()))
    precision = R @ torch.diag_embed(scales.double().clamp_min(1e-8) ** -2) @ R.transpose(1, 2)
    W, H = cameras.width, cameras.height
    tiles_x, tiles_y = math.ceil(W / TILE_SIZE), math.ceil(H / TILE_SIZE)
    depths, alphas = [], []
    for start in range(0, len(cameras), VIEWS_PER_CHUNK):
        check_cancel(cancel)
        cams = cameras[list(range(start, min(len(cameras), start + VIEWS_PER_CHUNK)))].to("cpu")
        with torch.no_grad():
            radii, means2d, zs, conics = project_gaussians(means, quats, scales, opacities, cams.viewmats, cams.Ks, W, H)
            offsets, gaussian_ids, _ = bin_tiles(means2d, radii, zs, W, H)
            V = cams.viewmats.double()
            Rc, tc = V[:, None, :3, :3], V[:, None, :3, 3]
            means_c = (Rc @ means.double()[None, :, :, None])[..., 0] + tc  # [C, N, 3]
            prec_c = Rc @ precision[None] @ Rc.transpose(-1, -2)  # [C, N, 3, 3]
        C = len(cams)
        out_depth = np.zeros((C, H, W), np.float32)
        out_alpha = np.zeros((C, H, W), np.float32)
        run_on_threads(
            _median_depth_tiles, C * tiles_x * tiles_y, means2d.double().numpy(), conics.double().numpy(), opacities.double().numpy(),
            means_c.numpy(), prec_c.reshape(C, -1, 9).numpy(), cams.Ks.double().numpy(),
            offsets.numpy(), gaussian_ids.numpy(), W, H, TILE_SIZE, tiles_x, tiles_y, out_depth, out_alpha,
        )  # fmt: skip
        depths.append(out_depth)
        alphas.append(out_alpha)
        if progress is not None:
            progress(min(1.0, (start + C) / len(cameras)), f"rendering splat depth, {len(cameras)} views")
    return DepthViews(
        viewmats=cameras.viewmats.double().cpu().numpy(),
        Ks=cameras.Ks.double().cpu().numpy(),
        depths=np.concatenate(depths),
        alphas=np.concatenate(alphas),
    )


@numba.njit(nogil=True, cache=True, fastmath=True)
def _median_depth_tiles(
    first, step, means2d, conics, opacities, means_c, prec_c, Ks, offsets, gaussian_ids, width, height, tile_size,
    tiles_x, tiles_y, out_depth, out_alpha,
):  # pragma: no cover - compiled
    C = means2d.shape[0]
    n_tiles = tiles_x * tiles_y
    for job in range(first, C * n_tiles, step):
        c, t = job // n_tiles, job % n_tiles
        x0, y0 = (t % tiles_x) * tile_size, (t // tiles_x) * tile_size
        start, end = offsets[job], offsets[job + 1]
        fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
        for y in range(y0, min(y0 + tile_size, height)):
            for x in range(x0, min(x0 + tile_size, width)):
                px, py = x + 0.5, y + 0.5
                dx_r, dy_r = (px - cx) / fx, (py - cy) / fy  # the ray (dx_r, dy_r, 1)
                T = 1.0
                median = 0.0
                found = False
                acc_t = 0.0
                for e in range(start, end):
                    g = gaussian_ids[e]
                    ddx, ddy = means2d[c, g, 0] - px, means2d[c, g, 1] - py
                    sigma = 0.5 * (conics[c, g, 0] * ddx * ddx + conics[c, g, 2] * ddy * ddy) + conics[c, g, 1] * ddx * ddy
                    if sigma < 0.0:
                        continue
                    alpha = min(0.999, opacities[g] * math.exp(-sigma))
                    if alpha < 1.0 / 255.0:
                        continue
                    next_T = T * (1.0 - alpha)
                    if next_T <= 1e-4:
                        break
                    # Depth of the Gaussian's density maximum along the ray: t = (d.P.mu) / (d.P.d).
                    P = prec_c[c, g]
                    pd0 = P[0] * dx_r + P[1] * dy_r + P[2]
                    pd1 = P[3] * dx_r + P[4] * dy_r + P[5]
                    pd2 = P[6] * dx_r + P[7] * dy_r + P[8]
                    denom = dx_r * pd0 + dy_r * pd1 + pd2
                    mu = means_c[c, g]
                    t_hit = (mu[0] * pd0 + mu[1] * pd1 + mu[2] * pd2) / denom if denom > 1e-20 else mu[2]
                    acc_t += alpha * T * t_hit
                    if not found and next_T < 0.5:
                        median = t_hit
                        found = True
                    T = next_T
                if not found:  # never reached one half: the alpha-weighted mean of the hits
                    median = acc_t / (1.0 - T) if T < 1.0 - 1e-6 else 0.0
                out_depth[c, y, x] = median
                out_alpha[c, y, x] = 1.0 - T


def view_weights(views: DepthViews) -> np.ndarray:
    """[C, H, W] confidence of each depth pixel: the cosine between its ray and the surface.

    Near a silhouette the rendered depth belongs to splats seen edge-on, blurred over the rim;
    weighting by the cosine (from the depth map's slope: a surface tilted by theta changes depth by
    tan(theta) pixel footprints per pixel) keeps those pixels from pushing the surface outward.
    """
    d = views.depths.astype(np.float64)
    covered = views.alphas >= COVERED_ALPHA
    f = views.Ks[:, 0, 0][:, None, None]
    footprint = np.maximum(d, 1e-6) / f  # world size of a pixel at that depth
    gy, gx = np.gradient(np.where(covered, d, np.nan), axis=(1, 2))
    slope = np.sqrt(gx**2 + gy**2) / footprint
    weights = 1.0 / np.sqrt(1.0 + slope**2)
    # Pixels next to an empty one have no two-sided slope: a rim, give them the least weight.
    return np.where(np.isfinite(weights), weights, 0.05).astype(np.float32)


def fuse(
    shape: tuple[int, int, int],
    origin: np.ndarray,  # [3]
    voxel: float,
    views: DepthViews,
    truncation: float,  # world units
    carve_viewmats: np.ndarray | None = None,  # [M, 4, 4] views whose masks carve
    carve_Ks: np.ndarray | None = None,  # [M, 3, 3]
    carve_masks: np.ndarray | None = None,  # [M, h, w] float32 in [0, 1]
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
    coarse_cells: int = 48,
) -> np.ndarray:
    """The fused field [X, Y, Z] float32: > 0 inside the rendered surface, < 0 outside, in [-1, 1].

    Coarse to fine: the field is first fused on a grid of about `coarse_cells` per side (with the
    truncation widened to its voxels); only the fine voxels of coarse cells near its surface are
    fused at full resolution, the others take the coarse sign. Same surface, a fraction of the work.
    """
    if carve_masks is None:
        carve_viewmats = np.zeros((0, 4, 4))
        carve_Ks = np.zeros((0, 3, 3))
        carve_masks = np.zeros((0, 1, 1), np.float32)
    args = (
        views.viewmats.astype(np.float64), views.Ks.astype(np.float64), views.depths, views.alphas, view_weights(views),
    )  # fmt: skip
    carve = (carve_viewmats.astype(np.float64), carve_Ks.astype(np.float64), np.ascontiguousarray(carve_masks, np.float32))
    origin = origin.astype(np.float64)
    stride = max(1, int(max(shape) // coarse_cells))
    if stride > 1:
        coarse_shape = tuple(int(n - 1) // stride + 1 for n in shape)
        coarse = np.empty(coarse_shape, np.float32)
        every = np.ones((1, 1, 1), np.bool_)
        run_on_threads(_fuse_slab, coarse_shape[0], coarse, 0, coarse_shape[0], origin, float(voxel * stride), *args, float(max(truncation, 2.0 * voxel * stride)),
                   COVERED_ALPHA, FREE_ALPHA, *carve, every, 1, coarse)  # fmt: skip
        # Cells whose samples are within the coarse band, or change sign, plus a cell around them.
        near = np.abs(coarse) < 1.0
        sign = coarse > 0
        change = np.zeros_like(near)
        for axis in range(3):
            diff = np.diff(sign, axis=axis)
            lo = [slice(None)] * 3
            lo[axis] = slice(0, -1)
            hi = [slice(None)] * 3
            hi[axis] = slice(1, None)
            change[tuple(lo)] |= diff
            change[tuple(hi)] |= diff
        active = ndimage.binary_dilation(near | change, iterations=1)
    else:
        coarse = np.zeros((1, 1, 1), np.float32)
        active = np.ones((1, 1, 1), np.bool_)
    field = np.empty(shape, np.float32)
    chunks = max(1, min(shape[0], 8))
    edges = np.linspace(0, shape[0], chunks + 1).astype(np.int64)
    for c in range(chunks):
        check_cancel(cancel)
        run_on_threads(_fuse_slab, int(edges[c + 1] - edges[c]), field, int(edges[c]), int(edges[c + 1]), origin, float(voxel), *args, float(truncation), COVERED_ALPHA, FREE_ALPHA,
                   *carve, active, stride, coarse)  # fmt: skip
        if progress is not None:
            progress((c + 1) / chunks, f"fusing depth into a {shape[0]}x{shape[1]}x{shape[2]} TSDF")
    return field


@numba.njit(nogil=True, cache=True)
def _bilinear(image, u, v):  # pragma: no cover - compiled
    """Bilinear sample at continuous pixel coordinates (centres at +0.5), clamped to the edge."""
    H, W = image.shape
    x = min(max(u - 0.5, 0.0), W - 1.0)
    y = min(max(v - 0.5, 0.0), H - 1.0)
    x0, y0 = int(x), int(y)
    x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
    fx, fy = x - x0, y - y0
    return (image[y0, x0] * (1 - fx) + image[y0, x1] * fx) * (1 - fy) + (image[y1, x0] * (1 - fx) + image[y1, x1] * fx) * fy


@numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
def _project_point(V, K, px, py, pz):  # pragma: no cover - compiled
    """Camera depth z and pixel (u, v) of the world point p in a view (viewmat V, intrinsics K);
    (u, v) are 0 when z <= 1e-6 (behind the camera): callers skip those."""
    z = V[2, 0] * px + V[2, 1] * py + V[2, 2] * pz + V[2, 3]
    if z <= 1e-6:
        return z, 0.0, 0.0
    x = V[0, 0] * px + V[0, 1] * py + V[0, 2] * pz + V[0, 3]
    y = V[1, 0] * px + V[1, 1] * py + V[1, 2] * pz + V[1, 3]
    return z, K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _fuse_slab(
    first, step, field, i0, i1, origin, voxel, viewmats, Ks, depths, alphas, weights, trunc, covered, free,
    carve_viewmats, carve_Ks, carve_masks, active, stride, coarse,
):  # pragma: no cover - compiled
    X, Y, Z = field.shape
    C, H, W = depths.shape
    M = carve_masks.shape[0]
    for i in range(i0 + first, i1, step):
        px = origin[0] + i * voxel
        for j in range(Y):
            py = origin[1] + j * voxel
            for k in range(Z):
                if stride > 1:
                    ci, cj, ck = i // stride, j // stride, k // stride
                    if not active[ci, cj, ck]:
                        # Far from the surface: the coarse sample's side (rounded to the nearest).
                        ni = min((i + stride // 2) // stride, coarse.shape[0] - 1)
                        nj = min((j + stride // 2) // stride, coarse.shape[1] - 1)
                        nk = min((k + stride // 2) // stride, coarse.shape[2] - 1)
                        field[i, j, k] = 1.0 if coarse[ni, nj, nk] > 0 else -1.0
                        continue
                pz = origin[2] + k * voxel
                # 1. Space carving with the fitted views' masks: outside any silhouette is empty.
                carved = False
                for m in range(M):
                    z, u, v = _project_point(carve_viewmats[m], carve_Ks[m], px, py, pz)
                    if z <= 1e-6:
                        continue
                    h, w = carve_masks.shape[1], carve_masks.shape[2]
                    if u < 0.0 or v < 0.0 or u >= w or v >= h:
                        continue
                    if _bilinear(carve_masks[m], u, v) < covered:
                        carved = True
                        break
                if carved:
                    field[i, j, k] = -1.0
                    continue
                # 2. Weighted mean of the truncated signed distance over the depth views.
                total = 0.0
                weight = 0.0
                for c in range(C):
                    z, u, v = _project_point(viewmats[c], Ks[c], px, py, pz)
                    if z <= 1e-6:
                        continue
                    if u < 0.0 or v < 0.0 or u >= W or v >= H:
                        continue
                    a = _bilinear(alphas[c], u, v)
                    if a < free:
                        total += 1.0  # empty pixel: free space
                        weight += 1.0
                        continue
                    if a < covered:
                        continue  # faint: cannot tell
                    d = depths[c, int(v), int(u)]
                    sdf = d - z  # > 0: in front of the surface
                    if sdf < -trunc:
                        continue  # occluded: this view cannot tell
                    w_pix = weights[c, int(v), int(u)]
                    total += w_pix * min(1.0, sdf / trunc)
                    weight += w_pix
                # No observation: hidden interior. Inside is positive (marching cubes on `field`).
                field[i, j, k] = -total / weight if weight > 0 else 1.0


def fuse_splat_depth(
    splats: dict,
    gaussians: GaussianArrays,
    resolution: int,
    cameras: Cameras | None = None,  # the fitted views, when known
    masks: torch.Tensor | None = None,  # [C, H, W, 1] their masks, for space carving
    extra_views: int = 32,
    truncation_voxels: float = 2.0,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[np.ndarray, DensityGrid]:
    """Render depth from the splats at the fitted views (+ `extra_views` around them), fuse, carve.

    Returns the field (inside > 0, iso-level 0) and the grid it lives on (`DensityGrid` holding it).
    """
    report = progress or (lambda f, m: None)
    origin, voxel, shape = grid_bounds(gaussians, resolution)
    lo, hi = origin, origin + voxel * (np.array(shape) - 1)
    center = 0.5 * (lo + hi)
    radius = 0.5 * float(np.linalg.norm(hi - lo))
    # Depth pixels about one voxel wide at the object: finer views add nothing to the grid.
    frame = 2.0 * radius / math.sin(math.radians(0.5 * EXTRA_FOV_DEG)) * 1.05 * math.tan(math.radians(0.5 * EXTRA_FOV_DEG))
    size = int(np.clip(math.ceil(frame / voxel), 64, 512))
    rendered = []
    width = height = size
    if cameras is not None and len(cameras) > 0:
        # The fitted views, re-rendered so their pixels are about a voxel wide too; the extra
        # views take the same image size so that all depth maps stack into one array.
        scale = size / max(cameras.width, cameras.height)
        width, height = max(1, round(cameras.width * scale)), max(1, round(cameras.height * scale))
        rendered.append(cameras.resized(width, height))
    if extra_views > 0:
        rendered.append(sphere_cameras(extra_views, center, radius, width, height))
    parts = []
    total = sum(len(c) for c in rendered)
    if total == 0:
        raise MeshingError(
            "no_views", "mesh.method 'tsdf' needs views: give the fitted views or set mesh.extra_views above 0"
        )
    done = 0
    for cams in rendered:
        part = render_depths(
            splats, cams, cancel,
            lambda f, m, n=len(cams), d=done: report(0.6 * (d + f * n) / total, m),
        )  # fmt: skip
        parts.append(part)
        done += len(cams)
    if masks is not None and cameras is not None and len(parts) and len(parts[0].alphas) == len(cameras):
        # In the fitted views the masks say where the object is: outside them is free space,
        # inside them a faint rendering is "cannot tell", never free space.
        m = torch.nn.functional.interpolate(
            masks.float().cpu().permute(0, 3, 1, 2), size=parts[0].alphas.shape[1:], mode="bilinear", align_corners=False
        )[:, 0].numpy()
        a = parts[0].alphas
        parts[0].alphas = np.where(m >= COVERED_ALPHA, np.maximum(a, 2 * FREE_ALPHA), 0.0).astype(np.float32)
    views = DepthViews(
        np.concatenate([p.viewmats for p in parts]), np.concatenate([p.Ks for p in parts]),
        np.concatenate([p.depths for p in parts]), np.concatenate([p.alphas for p in parts]),
    )  # fmt: skip
    carve = {}
    if masks is not None and cameras is not None:
        carve = dict(
            carve_viewmats=cameras.viewmats.double().cpu().numpy(),
            carve_Ks=cameras.Ks.double().cpu().numpy(),
            carve_masks=masks[..., 0].float().cpu().numpy(),
        )
    field = fuse(
        shape, origin, voxel, views, truncation_voxels * voxel, cancel=cancel,
        progress=lambda f, m: report(0.6 + 0.4 * f, m), **carve,
    )  # fmt: skip
    return field, DensityGrid(values=field, origin=origin, voxel=voxel)
