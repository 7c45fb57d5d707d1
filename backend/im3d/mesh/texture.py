"""UV atlas and albedo bake.

UVs: faces are grouped by the axis their normal points along most (+-X, +-Y, +-Z); each connected
group is projected orthographically onto its axis plane, so no triangle flips, and xatlas packs
those charts with padding. (xatlas' own chart search takes 15-25 s on 50k faces; the packing
alone takes well under a second.)

Bake: every texel whose centre lies in a triangle gets that triangle's surface point. With posed
views (a job's input views or last diffused frames) its colour is back-projected from the views
that see it best (bake_views.py); where none does, and for `im3d mesh` (a PLY, no views), it is
the density-weighted average of the SH degree-0 colours of the Gaussians around the point.
Empty texels take the colour of the nearest baked texel, so bilinear filtering and every
mip-map level see surface colours, never a dark background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import xatlas
from scipy import ndimage
from scipy.spatial import cKDTree

from im3d.errors import check_cancel
from im3d.mesh.bake_views import MIN_WEIGHT, Progress, ViewSource, bake_from_views
from im3d.mesh.density import GaussianArrays


@dataclass
class UVMesh:
    vertices: np.ndarray  # [V', 3] vertices split along UV seams
    faces: np.ndarray  # [F, 3]
    uvs: np.ndarray  # [V', 2] in [0, 1], glTF convention (v = 0 is the image's top row)
    source_vertex: np.ndarray  # [V'] index of each vertex in the unsplit mesh
    charts: int


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int) -> UVMesh:
    group = facing_groups(vertices, faces)
    # A vertex is split once per facing group it touches: a chart is a connected set of faces of
    # one group, and charts meet only along seams.
    key = faces.astype(np.int64) * 6 + group[:, None]
    unique_keys, inverse = np.unique(key.ravel(), return_inverse=True)
    split_faces = inverse.reshape(-1, 3)
    source = unique_keys // 6
    vertex_group = unique_keys % 6
    plane_axes = np.array([[1, 2], [2, 0], [0, 1]])[vertex_group // 2]  # right-handed (u, v) per axis
    positions = vertices[source]
    rows = np.arange(len(source))
    uv = np.stack([positions[rows, plane_axes[:, 0]], positions[rows, plane_axes[:, 1]]], axis=1)
    uv[vertex_group % 2 == 0, 0] *= -1.0  # mirror charts seen from the negative side: no flips

    atlas = xatlas.Atlas()
    atlas.add_mesh(positions.astype(np.float32), split_faces.astype(np.uint32), None, uv.astype(np.float32))
    chart_options = xatlas.ChartOptions()
    chart_options.use_input_mesh_uvs = True
    pack_options = xatlas.PackOptions()
    pack_options.resolution = int(texture_size)
    pack_options.padding = int(padding)
    pack_options.bilinear = True
    atlas.generate(chart_options, pack_options)
    vmapping, indices, uvs = atlas[0]
    return UVMesh(
        vertices=positions[vmapping],
        faces=indices.astype(np.int64),
        uvs=np.clip(uvs.astype(np.float64), 0.0, 1.0),
        source_vertex=source[vmapping],
        charts=int(atlas.chart_count),
    )


# The six facing directions, in group order: -X, +X, -Y, +Y, -Z, +Z.
_DIRECTIONS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64)
# A face may join a neighbouring group only while it faces that group's axis at least this much,
# so its projection never flips (0 would be edge-on).
_MIN_FACING = 0.35


def facing_groups(vertices: np.ndarray, faces: np.ndarray, rounds: int = 8) -> np.ndarray:
    """Group 0..5 (-X, +X, -Y, +Y, -Z, +Z) of each face: the axis its normal points along most.

    Along the borders between groups the plain arg-max gives ragged, one-face islands (hundreds
    of tiny charts, each a seam); a few rounds of majority vote among edge neighbours absorb them
    wherever the face still faces the neighbours' axis well enough.
    """
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    facing = normal @ _DIRECTIONS.T  # [F, 6]
    group = np.argmax(facing, axis=1)
    neighbours = _edge_neighbours(faces)  # [F, 3], -1 where open
    rows = np.arange(len(faces))
    for _ in range(rounds):
        votes = np.zeros((len(faces), 6), np.int64)
        for k in range(3):
            valid = neighbours[:, k] >= 0
            np.add.at(votes, (rows[valid], group[neighbours[valid, k]]), 1)
        candidate = np.argmax(votes, axis=1)
        # A face none of whose neighbours shares its group joins the neighbour group it faces best.
        isolated = votes[rows, group] == 0
        best_facing = np.argmax(np.where(votes > 0, facing, -np.inf), axis=1)
        candidate = np.where(isolated, best_facing, candidate)
        majority = (votes[rows, candidate] >= 2) | isolated
        switch = majority & (candidate != group) & (facing[rows, candidate] >= _MIN_FACING)
        if not switch.any():
            break
        # Neighbours switching together would trade places forever: of two adjacent switching
        # faces only the lower-numbered one moves this round.
        blocked = np.zeros(len(faces), bool)
        for k in range(3):
            other = neighbours[:, k]
            valid = other >= 0
            blocked[valid] |= switch[other[valid]] & (other[valid] < rows[valid])
        switch &= ~blocked
        group = np.where(switch, candidate, group)
    return group


def _edge_neighbours(faces: np.ndarray) -> np.ndarray:
    """For each face, the face across each of its three edges (-1 on open or non-manifold edges)."""
    F = len(faces)
    edges = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1).reshape(-1, 2)
    key = np.minimum(edges[:, 0], edges[:, 1]) * (faces.max() + 1) + np.maximum(edges[:, 0], edges[:, 1])
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    pair = np.nonzero(sorted_key[1:] == sorted_key[:-1])[0]
    # Only edges shared by exactly two faces.
    unique_pair = pair[((pair == 0) | (sorted_key[pair - 1] != sorted_key[pair])) &
                       ((pair + 2 >= len(sorted_key)) | (sorted_key[np.minimum(pair + 2, len(sorted_key) - 1)] != sorted_key[pair]))]  # fmt: skip
    a, b = order[unique_pair], order[unique_pair + 1]
    neighbours = np.full(F * 3, -1, np.int64)
    neighbours[a] = b // 3
    neighbours[b] = a // 3
    return neighbours.reshape(F, 3)


@numba.njit(cache=True)
def _rasterize_uv(uv_px, faces, face_of_texel, bary):
    """Texels whose centre falls in a triangle: face id + barycentrics. Returns overlapping texels."""
    H, W = face_of_texel.shape
    overlaps = 0
    for f in range(faces.shape[0]):
        ax, ay = uv_px[faces[f, 0], 0], uv_px[faces[f, 0], 1]
        bx, by = uv_px[faces[f, 1], 0], uv_px[faces[f, 1], 1]
        cx, cy = uv_px[faces[f, 2], 0], uv_px[faces[f, 2], 1]
        det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
        if abs(det) < 1e-12:
            continue
        x0 = max(0, int(np.floor(min(ax, bx, cx) - 0.5)))
        x1 = min(W - 1, int(np.ceil(max(ax, bx, cx) - 0.5)))
        y0 = max(0, int(np.floor(min(ay, by, cy) - 0.5)))
        y1 = min(H - 1, int(np.ceil(max(ay, by, cy) - 0.5)))
        for y in range(y0, y1 + 1):
            py = y + 0.5
            for x in range(x0, x1 + 1):
                px = x + 0.5
                l0 = ((by - cy) * (px - cx) + (cx - bx) * (py - cy)) / det
                l1 = ((cy - ay) * (px - cx) + (ax - cx) * (py - cy)) / det
                l2 = 1.0 - l0 - l1
                if l0 >= -1e-6 and l1 >= -1e-6 and l2 >= -1e-6:
                    if face_of_texel[y, x] >= 0 and face_of_texel[y, x] != f:
                        overlaps += 1
                    face_of_texel[y, x] = f
                    bary[y, x, 0] = l0
                    bary[y, x, 1] = l1
                    bary[y, x, 2] = l2
    return overlaps


def texel_samples(uv_mesh: UVMesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Covered texels: (world points [P,3], face [P], barycentrics [P,3], rows [P], cols [P], overlapping texels)."""
    face_of_texel = np.full((size, size), -1, np.int64)
    bary = np.zeros((size, size, 3))
    overlaps = _rasterize_uv(uv_mesh.uvs * size, uv_mesh.faces, face_of_texel, bary)
    rows, cols = np.nonzero(face_of_texel >= 0)
    f = face_of_texel[rows, cols]
    weights = bary[rows, cols]
    corners = uv_mesh.vertices[uv_mesh.faces[f]]  # [P, 3, 3]
    points = np.einsum("pc,pcd->pd", weights, corners)
    return points, f, weights, rows, cols, int(overlaps)


def texel_surface_points(uv_mesh: UVMesh, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Covered texels: (world points [P,3], face [P], rows [P], cols [P], overlapping texels)."""
    points, f, _, rows, cols, overlaps = texel_samples(uv_mesh, size)
    return points, f, rows, cols, overlaps


def splat_colors_at(
    points: np.ndarray,  # [P, 3]
    gaussians: GaussianArrays,
    blur: float,
    groups: np.ndarray | None = None,  # [P] group (face) of each point
    group_centres: np.ndarray | None = None,  # [G, 3]
    neighbours: int = 32,
    cancel=None,
) -> np.ndarray:
    """Density-weighted mean SH-DC colour of the Gaussians near each point, [P, 3] in [0, 1].

    `blur` (world units) widens every Gaussian a little, so a point a fraction of a voxel off a
    flat splat still sees it. With `groups`, the candidates are the `neighbours` Gaussians nearest
    to each group's centre (one tree query per face instead of one per texel: ~10x fewer).
    """
    tree = cKDTree(gaussians.means)
    R = gaussians.rotations  # (R S^2 R^T + b^2 I)^-1 = R (S^2 + b^2)^-1 R^T: no batched inverse
    inv_cov = np.einsum("nij,nj,nkj->nik", R, 1.0 / (gaussians.scales**2 + blur * blur), R).reshape(-1, 9)
    k = min(neighbours, len(gaussians.means))
    check_cancel(cancel)
    if groups is None:
        _, index = tree.query(points, k=k, workers=-1)
        groups = np.arange(len(points))
    else:
        _, index = tree.query(group_centres, k=k, workers=-1)
    index = index.reshape(-1, k).astype(np.int64)
    check_cancel(cancel)
    return _weighted_colors(points, groups.astype(np.int64), index, gaussians.means, inv_cov, gaussians.opacities, gaussians.rgb)


@numba.njit(parallel=True, cache=True, fastmath=True)
def _weighted_colors(points, groups, index, means, inv_cov, opacities, rgb):
    P = points.shape[0]
    K = index.shape[1]
    out = np.empty((P, 3))
    for p in numba.prange(P):
        total = 0.0
        r = g = b = 0.0
        for n in range(K):
            i = index[groups[p], n]
            dx = points[p, 0] - means[i, 0]
            dy = points[p, 1] - means[i, 1]
            dz = points[p, 2] - means[i, 2]
            q = (inv_cov[i, 0] * dx * dx + inv_cov[i, 4] * dy * dy + inv_cov[i, 8] * dz * dz
                 + 2.0 * (inv_cov[i, 1] * dx * dy + inv_cov[i, 2] * dx * dz + inv_cov[i, 5] * dy * dz))  # fmt: skip
            w = opacities[i] * np.exp(-0.5 * min(q, 80.0)) + 1e-30 * (n == 0)  # nearest wins when all vanish
            total += w
            r += w * rgb[i, 0]
            g += w * rgb[i, 1]
            b += w * rgb[i, 2]
        out[p, 0] = r / total
        out[p, 1] = g / total
        out[p, 2] = b / total
    return out


def fill_empty_texels(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every uncovered texel takes its nearest covered texel's colour (seams and mip-maps stay clean)."""
    if covered.all() or not covered.any():
        return image
    _, (rows, cols) = ndimage.distance_transform_edt(~covered, return_indices=True)
    return image[rows, cols]


def bake_albedo(
    uv_mesh: UVMesh,
    gaussians: GaussianArrays,
    size: int,
    blur: float,
    cancel=None,
    views: ViewSource | None = None,
    normals: np.ndarray | None = None,  # [V', 3] unit outward normals of uv_mesh.vertices
    progress: Progress | None = None,
) -> tuple[np.ndarray, dict]:
    """Albedo texture [size, size, 3] uint8 and bake statistics.

    With `views` (posed images of the object), texels take the colour the views see there
    (bake_views.py); the splats' colours fill in where no view sees the surface well enough
    (blended by the views' confidence, so there is no hard edge between the two). Without views
    every texel takes the splats' colour.
    """
    report = progress or (lambda fraction, message: None)
    points, face, bary, rows, cols, overlaps = texel_samples(uv_mesh, size)
    check_cancel(cancel)
    colors = np.zeros((len(points), 3))
    confidence = np.zeros(len(points))
    view_stats: dict = {}
    if views is not None and len(points):
        tri = uv_mesh.vertices[uv_mesh.faces]  # [F, 3, 3]
        face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        face_area = 0.5 * np.linalg.norm(face_normals, axis=1)
        face_normals /= np.maximum(2.0 * face_area, 1e-30)[:, None]
        if normals is None:
            texel_normals = face_normals[face]
        else:
            texel_normals = np.einsum("pc,pcd->pd", bary, normals[uv_mesh.faces[face]])
            texel_normals /= np.maximum(np.linalg.norm(texel_normals, axis=1, keepdims=True), 1e-30)
        # One texel covers this much surface on average: what the views' resolution is matched to.
        texel_size = float(np.sqrt(face_area.sum() / len(points)))
        view_colors, weight, view_stats = bake_from_views(
            points, texel_normals, face_normals[face], uv_mesh.vertices, uv_mesh.faces, views, texel_size,
            progress=lambda f, m: report(0.9 * f, m), cancel=cancel,
        )  # fmt: skip
        confidence = np.clip(weight / MIN_WEIGHT, 0.0, 1.0)
        colors = view_colors * confidence[:, None]
    need_splats = confidence < 1.0
    if need_splats.any():
        check_cancel(cancel)
        report(0.9, "texture: splat colours where no view sees the surface")
        centroids = uv_mesh.vertices[uv_mesh.faces].mean(axis=1)
        splat = splat_colors_at(points[need_splats], gaussians, blur, groups=face[need_splats], group_centres=centroids, cancel=cancel)
        colors[need_splats] += splat * (1.0 - confidence[need_splats, None])
    image = np.zeros((size, size, 3))
    image[rows, cols] = colors
    covered = np.zeros((size, size), bool)
    covered[rows, cols] = True
    image = fill_empty_texels(image, covered)
    stats = {"texels_baked": int(len(rows)), "uv_overlap_texels": overlaps, "uv_coverage": float(covered.mean())}
    if views is not None:
        stats["texture_source"] = "views"
        stats["view_texels"] = float((confidence >= 1.0).mean()) if len(points) else 0.0
        stats.update({f"bake_{k}": v for k, v in view_stats.items()})
    else:
        stats["texture_source"] = "splats"
    report(1.0, "texture: baked")
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), stats
