"""Pull the surface in to where the views' rendered depth, corrected by its own measured lag, puts it.

    vertices, lag = fit_depth(vertices, faces, cameras, silhouettes, depths)

Carving (hull.py) stops a margin in front of the splats' rendered depth, and the surface is the
nearest of the views' carvings: the rendered depth lies behind the true surface by an amount that
varies pixel to pixel, and a margin smaller than most of that variation lets one view eat the
object. So wherever depth alone shapes the surface (a cow's flank, a bunny's side: what no
silhouette shows), the mesh is left up to a margin *outside* the true surface, and the views'
colours, baked onto it, land beside their places when seen from elsewhere (the checker edges
that cost the cow a dB).

This step asks all the views at once instead of the nearest. The lag of the rendered depth behind
the true surface, along the normal, is about the same over one object (0.02-0.05 of the half-size:
half-transparent Gaussians inside the surface paint it with their tails) and is measured on the
object itself: at its outline in one view (the ends of the mesh's silhouette edges, which the
outline fit put there) the mesh lies on the silhouette to a pixel - on the true surface - and the
views facing that spot see how far behind it their depth lies. Each vertex then
asks to move in by the median, over the views that face it and see it, of how far in front of
their depth (less the lag) it lies; never out (the carving's bound stays), the outline vertices
pinned, and the moves blended over the mesh like the outline fit's.

Near a view's outline (a vertex across its ray, within a pixel of its silhouette's edge) the
silhouette has already placed the surface to about a pixel, and the views' depth is noisier than
that: such a vertex moves in only by what exceeds the depth's own spread (the lag samples' median
absolute deviation), and takes off the whole lag whatever the concavity. Clipping "never out"
turns noise into an inward bias, which cost round objects their outlines when these vertices
moved freely; held fixed, though, a face seen edge-on - all of it within a pixel of that view's
outline, though the silhouette shows only its furthest point - kept the hull's bulge (a plate
0.008 of the radius outside on both faces, 3.2 dB below its splats).

The lag is not the same on every surface: the views' depth lies on a concave one (a pocket's floor,
a bowl's inside) nearly where the surface is. Measured on the bench's fits against the true surface
(views facing it, eleven objects): pockets and crevices -0.004 to 0.024 of the radius behind it
against 0.013 to 0.051 elsewhere on the same object, less on every one; a bowl's inside 0.000
against its outside's 0.040. So the lag a vertex subtracts fades out where the mesh around it is
concave.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np
import torch
from scipy import sparse
from scipy.spatial import cKDTree

from im3d.cameras import Cameras
from im3d.errors import check_cancel
from im3d.mesh.cleanup import vertex_normals
from im3d.mesh.outlines import edge_laplacian, signed_distance, silhouette_vertices, smooth_moves
from im3d.mesh.zbuffer import bilinear, rasterize_triangles
from im3d.splats.raster.cpu import num_threads

# A view speaks for a vertex when the vertex faces it at least this much (cos of the angle between
# the normal and the direction to the camera): grazing depth is the least reliable.
FACING = 0.5
# The lag is measured at the vertices on a view's outline: those that end one of the mesh's
# silhouette edges there (as the outline fit moves them: outlines.silhouette_vertices), visible,
# projecting within OUTLINE_PIXELS of the silhouette's edge; they stay pinned. Measuring at every
# vertex whose normal lies across the ray (|cos| < ACROSS) that near the edge took the faces beside
# a flat-faced object's sharp edges, seen grazing, which lie outside its surface (+0.006 to +0.008 r
# on a plate with pins, fandisk, a board): the lag came out 1.2-2x the true one there
# (docs/benchmarks.md, "Where the lag is measured").
OUTLINE_PIXELS = 1.0
ACROSS = 0.2
# Those vertices across the ray near an outline move in only by what exceeds this many of the lag
# samples' median absolute deviations (docs/benchmarks.md, "Faces seen edge-on": 1.5 and 2 kept
# less of the plates' gain, freeing them outright cost round objects up to 0.7 dB, pinning them
# cost a plate 3.2 dB).
BAND_SPREADS = 1.0
# Too few outline samples to measure the lag: the step is skipped.
MIN_SAMPLES = 200
# A vertex moves only when at least this many views agree on where its surface lies (one view's
# stray depth cannot dig a pit).
MIN_VIEWS = 2
# Concavity is read at this share of the object's half-size: how far the surface within it lies on
# the vertex's normal side, averaged over that neighbourhood again (a hull's ripples average out, a
# pocket's floor and walls do not). The lag fades from whole at FLAT to none at CONCAVE (measured on
# the bench, docs/benchmarks.md "Concave surfaces": a sharp step, or no smoothing, also took the
# lag off the ripples of a sphere and a wedge and cost them 0.2-0.4 dB; a radius of 0.07 gained a
# pocket more and cost the sphere more, 0.15 cost nothing on convex objects and kept half the gain).
CONCAVITY_RADIUS = 0.1
FLAT = 0.02
CONCAVE = 0.05
# The concavity is read on a subsample of the vertices about this many to the radius (the same few
# dozen neighbours per ball whatever the face budget), and each vertex takes its nearest sample's.
SAMPLES_PER_RADIUS = 3.0


def fit_depth(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3] outward
    cameras: Cameras,  # the fitted views
    silhouettes: torch.Tensor | np.ndarray,  # [C, H, W] their silhouettes in [0, 1] (edge at 1/2), at cameras' size
    depths: torch.Tensor | np.ndarray,  # [C, H, W] the splats' rendered (median) depth, camera z, inf where none
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, float]:
    """([V, 3] vertices moved in along their normals, the measured lag in world units; nan when
    there were too few outline samples to measure it and nothing moved)."""
    silhouettes = silhouettes.numpy() if isinstance(silhouettes, torch.Tensor) else np.asarray(silhouettes)
    depths = depths.numpy() if isinstance(depths, torch.Tensor) else np.asarray(depths)
    v = np.asarray(vertices, np.float64).copy()
    faces = np.asarray(faces, np.int64)
    C, H, W = silhouettes.shape
    if len(faces) == 0 or C < 2:
        return v, float("nan")
    normals = vertex_normals(v, faces)
    corners = v[faces]  # the faces' normals and centres, once for all views
    silhouette_from = partial(
        silhouette_vertices, faces, np.bincount(faces.ravel(), minlength=len(v)),
        np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), corners.mean(axis=1),
    )  # fmt: skip
    viewmats, Ks = cameras.viewmats.double().numpy(), cameras.Ks.double().numpy()

    def per_view(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_cancel(cancel)
        return _view_samples(v, faces, normals, silhouette_from, viewmats[c], Ks[c], W, H, silhouettes[c], depths[c])

    # Views on threads (the rasteriser releases the GIL), stacked in view order.
    with ThreadPoolExecutor(max(1, min(num_threads(), C))) as pool:
        per_views = list(pool.map(per_view, range(C)))
    behind = np.stack([p[0] for p in per_views])  # [C, V] along the normal, nan where the view does not speak
    on_outline = np.stack([p[1] for p in per_views])  # [C, V] where the lag is measured
    near_outline = np.stack([p[2] for p in per_views])  # [C, V] across the ray near the outline

    # 1. The lag: how far behind the vertices on some *other* view's outline the views' depth lies.
    outline_count = on_outline.sum(axis=0)
    at_outlines = behind[(outline_count[None] - on_outline) > 0]
    at_outlines = at_outlines[np.isfinite(at_outlines)]
    if len(at_outlines) < MIN_SAMPLES:
        return v, float("nan")
    lag = float(np.median(at_outlines))
    spread = float(np.median(np.abs(at_outlines - lag)))

    # 2. Each vertex asks to move in by the median, over the views that see it, of how far in
    #    front of their depth less its lag it lies (never out); near an outline only by what
    #    exceeds the depth's spread; the outline vertices themselves ask to stay.
    speaks = np.isfinite(behind).sum(axis=0) >= MIN_VIEWS
    asked = np.zeros(len(v))
    if speaks.any():
        radius = CONCAVITY_RADIUS * 0.5 * float(np.ptp(v, axis=0).max())
        lags = lag * np.clip((CONCAVE - concavity(v, normals, radius)) / (CONCAVE - FLAT), 0.0, 1.0)
        # Near an outline: the whole lag (faded in a crease it dug a duck's neck in, 0.018 F) and
        # the depth's spread.
        lags = np.where(near_outline.any(axis=0), lag + BAND_SPREADS * spread, lags)
        asked[speaks] = np.clip(np.nanmedian(behind[:, speaks], axis=0) - lags[speaks], 0.0, None)
    pinned = outline_count > 0
    asked[pinned] = 0.0
    moves = smooth_moves(edge_laplacian(faces, len(v)), (speaks | pinned).astype(np.float64), asked)
    return v - normals * moves[:, None], lag


def concavity(
    vertices: np.ndarray,  # [V, 3]
    normals: np.ndarray,  # [V, 3] unit, outward
    radius: float,  # world units
) -> np.ndarray:
    """[V] how far the surface within `radius` of each vertex lies on its normal's side, per unit
    radius (the centroid of the vertices in the ball, less the vertex, along its normal), averaged
    over the ball: ~0 on a plane, about -radius/(4R) on a sphere of radius R (convex), > 0 in a
    pocket or a bowl's inside."""
    if len(vertices) == 0 or not radius > 0:  # no surface, or all of it in one point
        return np.zeros(len(vertices))
    # A subsample spread evenly over the surface (one vertex per cell of a grid radius/3 apart).
    cells = np.floor(vertices / (radius / SAMPLES_PER_RADIUS)).astype(np.int64)
    _, chosen = np.unique(cells, axis=0, return_index=True)
    points, directions = vertices[chosen], normals[chosen]
    tree = cKDTree(points)
    pairs = tree.query_pairs(radius, output_type="ndarray")  # [P, 2]
    # Only the surface on the vertex's own side: across a wall thinner than the radius (a bowl's)
    # the other face would read as a steep convex drop.
    pairs = pairs[np.einsum("ij,ij->i", directions[pairs[:, 0]], directions[pairs[:, 1]]) > 0]
    n = len(points)
    ball = sparse.coo_matrix((np.ones(2 * len(pairs)), (np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]])), shape=(n, n))
    ball = (ball + sparse.identity(n)).tocsr()  # each ball holds its centre
    count = np.asarray(ball.sum(axis=1)).ravel()
    rise = np.einsum("ij,ij->i", ball @ points / count[:, None] - points, directions) / radius
    smoothed = ball @ rise / count
    # Each vertex takes the nearest sample on its own side (a thin wall's two faces share cells).
    nearest = tree.query(vertices, k=min(8, n))[1].reshape(len(vertices), -1)  # [V, k]
    own_side = np.einsum("vkj,vj->vk", directions[nearest], normals) > 0
    return smoothed[nearest[np.arange(len(vertices)), np.argmax(own_side, axis=1)]]


def _view_samples(v, faces, normals, silhouette_from, viewmat, K, W, H, silhouette, depth):
    """([V] how far behind each vertex the view's depth lies, along the normal, nan where the view
    does not see it facing; [V] bool, the vertex ends a silhouette edge on the view's outline;
    [V] bool, it lies across the view's ray near that outline)."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    cam = v @ R.T + t
    z = cam[:, 2]
    ahead = z > 1e-6
    zs = np.where(ahead, z, 1.0)
    u, w = K[0, 0] * cam[:, 0] / zs + K[0, 2], K[1, 1] * cam[:, 1] / zs + K[1, 2]
    ray = np.maximum(np.linalg.norm(cam, axis=1), 1e-12)  # the vertex's distance from the camera
    cos = -np.einsum("ij,ij->i", normals @ R.T, cam) / ray  # normal . direction to the camera
    inside = ahead & (u >= 0) & (u < W) & (w >= 0) & (w < H)
    px = np.clip(np.floor(u).astype(np.int64), 0, W - 1)
    py = np.clip(np.floor(w).astype(np.int64), 0, H - 1)
    # Not behind another part of the mesh (two pixels' depth).
    hits = rasterize_triangles(v, faces, viewmat, K, W, H)
    front = hits.depth[py, px]
    visible = inside & np.isfinite(front) & (z <= front + 2.0 * zs / K[0, 0])
    # Outline: the end of a silhouette edge of the mesh, on the silhouette's edge.
    edge = bilinear(signed_distance(silhouette)[..., None], np.stack([u / W, w / H], axis=-1))[:, 0]
    ends, _ = silhouette_from(-R.T @ t)  # outlines.silhouette_vertices seen from the camera
    near_outline = inside & (np.abs(cos) < ACROSS) & (np.abs(edge) <= OUTLINE_PIXELS)
    on_outline = visible & ends & (np.abs(edge) <= OUTLINE_PIXELS)
    seen = visible & (cos > FACING)
    rendered = depth[py, px]
    seen &= np.isfinite(rendered)
    # Camera z to distance along the ray (x |cam| / z), then along the normal (x cos).
    behind = np.where(seen, (rendered - zs) * ray / zs * cos, np.nan)
    return behind, on_outline, near_outline
