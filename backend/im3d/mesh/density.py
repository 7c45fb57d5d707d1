"""Opacity-weighted Gaussian density on a regular grid, and its iso-surface.

    d(x) = sum_i sigmoid(opacity_i) * exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i))

Each Gaussian is scattered into the grid cells inside its 3-sigma box by a numba kernel. The grid is
cut into slabs along x and every slab is filled by one thread from the Gaussians that overlap it, so
the threads never write the same cell and memory stays one float32 grid (no per-Gaussian buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from im3d.errors import check_cancel
from im3d.mesh.errors import MeshingError

CUTOFF_SIGMA = 3.0  # Gaussians are evaluated inside their 3-sigma ellipsoid
# Every Gaussian is widened by this many voxels (in sigma, integral kept) so that thin, flat splats
# are sampled without aliasing: a disc thinner than a voxel would otherwise fall between samples.
ANTIALIAS_VOXELS = 1.0


@dataclass
class DensityGrid:
    values: np.ndarray  # [X, Y, Z] float32
    origin: np.ndarray  # [3] world position of sample (0, 0, 0)
    voxel: float  # spacing between samples, world units

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        return self.origin[None, :] + ijk * self.voxel


@dataclass
class GaussianArrays:
    """Activated splat parameters as float64 numpy arrays (what the kernels take)."""

    means: np.ndarray  # [N, 3]
    rotations: np.ndarray  # [N, 3, 3]
    scales: np.ndarray  # [N, 3] linear
    opacities: np.ndarray  # [N] in (0, 1)
    rgb: np.ndarray  # [N, 3] SH degree-0 colour, in [0, 1]


def quats_to_rotations(quats: np.ndarray) -> np.ndarray:
    """wxyz quaternions [N, 4] (any length) -> rotation matrices [N, 3, 3]."""
    q = quats / np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    R = np.empty((q.shape[0], 3, 3))
    R[:, 0, 0] = 1 - 2 * (y * y + z * z)
    R[:, 0, 1] = 2 * (x * y - w * z)
    R[:, 0, 2] = 2 * (x * z + w * y)
    R[:, 1, 0] = 2 * (x * y + w * z)
    R[:, 1, 1] = 1 - 2 * (x * x + z * z)
    R[:, 1, 2] = 2 * (y * z - w * x)
    R[:, 2, 0] = 2 * (x * z - w * y)
    R[:, 2, 1] = 2 * (y * z + w * x)
    R[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def grid_bounds(gaussians: GaussianArrays, resolution: int) -> tuple[np.ndarray, float, tuple[int, int, int]]:
    """Origin, voxel size and shape of a cubic-voxel grid around the splats.

    Far-away floaters should not shrink the object to a few voxels, so the box is the 0.5..99.5
    percentile range of the (opacity-weighted) centres grown by 10 %, never beyond the real extent,
    plus a margin of three typical Gaussian sizes and two empty voxels on each side.
    """
    means = gaussians.means
    weights = gaussians.opacities
    lo_all, hi_all = means.min(0), means.max(0)
    lo_robust = _weighted_percentile(means, weights, 0.005)
    hi_robust = _weighted_percentile(means, weights, 0.995)
    extent = hi_robust - lo_robust
    lo = np.maximum(lo_all, lo_robust - 0.1 * extent.max())
    hi = np.minimum(hi_all, hi_robust + 0.1 * extent.max())
    typical = float(np.median(gaussians.scales.max(1)))
    margin = CUTOFF_SIGMA * typical
    lo, hi = lo - margin, hi + margin
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 1e-9:
        raise MeshingError(
            "degenerate_grid",
            f"the splats span no volume (extent {size:.3g}); all Gaussians sit at one point — "
            "check that the splats were fitted",
        )
    voxel = size / (resolution - 5)  # two empty voxels each side, so every surface closes
    shape = tuple(int(np.ceil((hi[a] - lo[a]) / voxel)) + 5 for a in range(3))
    origin = lo - 2 * voxel
    return origin, voxel, shape  # type: ignore[return-value]


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    out = np.empty(values.shape[1])
    for axis in range(values.shape[1]):
        order = np.argsort(values[:, axis])
        cumulative = np.cumsum(weights[order])
        index = np.searchsorted(cumulative, q * cumulative[-1])
        out[axis] = values[order[min(index, len(order) - 1)], axis]
    return out


def evaluate_density(
    gaussians: GaussianArrays,
    resolution: int,
    cancel=None,
    progress=None,
) -> DensityGrid:
    """Scatter the Gaussians into a grid with `resolution` samples along its longest side."""
    origin, voxel, shape = grid_bounds(gaussians, resolution)
    # Axes thinner than ANTIALIAS_VOXELS are widened to it, keeping each Gaussian's integral, so
    # a dense sheet of splats keeps its density. (Widening only thin axes keeps the boxes small.)
    widened = np.maximum(gaussians.scales, ANTIALIAS_VOXELS * voxel)
    weights = gaussians.opacities * np.prod(gaussians.scales / widened, axis=1)
    R = gaussians.rotations
    cov = np.einsum("nij,nj,nkj->nik", R, widened**2, R)
    inv_cov = np.einsum("nij,nj,nkj->nik", R, widened**-2.0, R)
    half = CUTOFF_SIGMA * np.sqrt(np.diagonal(cov, axis1=1, axis2=2))  # [N, 3] half box
    centre = (gaussians.means - origin[None]) / voxel  # [N, 3] in voxel units
    box_lo = np.clip(np.ceil(centre - half / voxel), 0, np.array(shape) - 1).astype(np.int64)
    box_hi = np.clip(np.floor(centre + half / voxel), -1, np.array(shape) - 1).astype(np.int64)
    visible = np.all(box_hi >= box_lo, axis=1) & (weights > 1e-6)
    index = np.nonzero(visible)[0]

    values = np.zeros(shape, np.float32)
    # Slabs along x; each thread takes whole slabs, so writes never collide.
    num_slabs = max(1, min(shape[0], 4 * numba.get_num_threads()))
    edges = np.linspace(0, shape[0], num_slabs + 1).astype(np.int64)
    # Gaussian -> slabs it overlaps, as CSR lists.
    first = np.searchsorted(edges, box_lo[index, 0], side="right") - 1
    last = np.searchsorted(edges, box_hi[index, 0], side="right") - 1
    counts = last - first + 1
    slab_of = np.repeat(first, counts) + _ranges(counts)
    member = np.repeat(index, counts)
    order = np.argsort(slab_of, kind="stable")
    slab_of, member = slab_of[order], member[order]
    starts = np.searchsorted(slab_of, np.arange(num_slabs + 1))

    # Group slabs into chunks so the caller can cancel and see progress on big grids.
    chunk = max(numba.get_num_threads(), num_slabs // 4)
    for c0 in range(0, num_slabs, chunk):
        check_cancel(cancel)
        c1 = min(num_slabs, c0 + chunk)
        _scatter_slabs(
            values, edges[c0 : c1 + 1], starts[c0 : c1 + 1], member,
            centre.astype(np.float64), inv_cov.reshape(-1, 9) * voxel * voxel,
            weights.astype(np.float64), box_lo, box_hi,
        )  # fmt: skip
        if progress is not None:
            progress(c1 / num_slabs, f"density grid {shape[0]}x{shape[1]}x{shape[2]}")
    return DensityGrid(values=values, origin=origin, voxel=voxel)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - offsets


@numba.njit(parallel=True, cache=True, fastmath=True)
def _scatter_slabs(values, edges, starts, member, centre, inv_cov, weights, box_lo, box_hi):
    num = edges.shape[0] - 1
    cutoff = CUTOFF_SIGMA * CUTOFF_SIGMA
    for s in numba.prange(num):
        x0, x1 = edges[s], edges[s + 1]
        for m in range(starts[s], starts[s + 1]):
            g = member[m]
            a, b, c = inv_cov[g, 0], inv_cov[g, 1], inv_cov[g, 2]
            e, f, h = inv_cov[g, 4], inv_cov[g, 5], inv_cov[g, 8]
            w = weights[g]
            i0 = max(box_lo[g, 0], x0)
            i1 = min(box_hi[g, 0], x1 - 1)
            for i in range(i0, i1 + 1):
                dx = i - centre[g, 0]
                for j in range(box_lo[g, 1], box_hi[g, 1] + 1):
                    dy = j - centre[g, 1]
                    qxy = a * dx * dx + 2.0 * b * dx * dy + e * dy * dy
                    lin = 2.0 * (c * dx + f * dy)
                    for k in range(box_lo[g, 2], box_hi[g, 2] + 1):
                        dz = k - centre[g, 2]
                        q = qxy + dz * (lin + h * dz)
                        if q < cutoff:
                            values[i, j, k] += w * np.exp(-0.5 * q)


def sample_grid(grid: DensityGrid, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of the grid at world `points` [P, 3] (0 outside)."""
    ijk = (points - grid.origin[None]) / grid.voxel
    return ndimage.map_coordinates(grid.values, ijk.T, order=1, mode="constant", cval=0.0)


def typical_peak_density(grid: DensityGrid, gaussians: GaussianArrays) -> float:
    """Opacity-weighted median of the density at the splats' centres (where the field peaks)."""
    at_centres = sample_grid(grid, gaussians.means)
    w = gaussians.opacities
    order = np.argsort(at_centres)
    cumulative = np.cumsum(w[order])
    if not cumulative.size or cumulative[-1] <= 0:
        return 0.0
    return float(at_centres[order[min(np.searchsorted(cumulative, 0.5 * cumulative[-1]), len(order) - 1)]])


def normalise_locally(values: np.ndarray, floor: float, radius_voxels: int = 2) -> None:
    """values /= max(local maximum within `radius_voxels`, floor), in place.

    A sheet of splats is never evenly dense: where the discs overlap more, the ridge is higher.
    A global iso-level then cuts holes where the sheet is thin and swells it where it is thick;
    relative to the local ridge, every part of the sheet peaks at 1 and the iso-surface keeps the
    same small offset from the splats. `floor` keeps faint tails (floaters, empty space) faint.
    """
    _normalise_by_local_max(values, np.float32(max(floor, 1e-30)), radius_voxels)


@numba.njit(parallel=True, cache=True)
def _normalise_by_local_max(values, floor, r):
    """Separable box maximum (x, then y, then z passes) and the division, in two temporaries."""
    X, Y, Z = values.shape
    a = np.empty_like(values)
    for i in numba.prange(X):
        lo, hi = max(0, i - r), min(X, i + r + 1)
        for j in range(Y):
            for k in range(Z):
                m = values[lo, j, k]
                for t in range(lo + 1, hi):
                    m = max(m, values[t, j, k])
                a[i, j, k] = m
    b = np.empty_like(values)
    for i in numba.prange(X):
        for j in range(Y):
            lo, hi = max(0, j - r), min(Y, j + r + 1)
            for k in range(Z):
                m = a[i, lo, k]
                for t in range(lo + 1, hi):
                    m = max(m, a[i, t, k])
                b[i, j, k] = m
    for i in numba.prange(X):
        for j in range(Y):
            for k in range(Z):
                lo, hi = max(0, k - r), min(Z, k + r + 1)
                m = floor
                for t in range(lo, hi):
                    m = max(m, b[i, j, t])
                values[i, j, k] = values[i, j, k] / m


def fill_cavities(values: np.ndarray, threshold: float) -> int:
    """Raise closed cavities (empty space not connected to the outside) above the threshold.

    Splats sit on the surface, so the inside of an object is empty and the iso-surface would have
    an inner wall facing inward; filling cavities leaves the outer surface only. Returns the number
    of voxels filled.
    """
    empty = values <= threshold
    labels, count = ndimage.label(empty)
    if count <= 1:
        return 0
    border = np.unique(
        np.concatenate(
            [labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel(),
             labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )  # fmt: skip
    outside = np.zeros(count + 1, bool)
    outside[border] = True
    outside[0] = True  # label 0 is the occupied space
    cavity = ~outside[labels]
    values[cavity] = 2.0 * threshold if threshold > 0 else 1.0
    return int(cavity.sum())
