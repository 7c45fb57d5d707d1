"""A small z-buffer triangle rasterizer (numba, CPU): which face each pixel sees, and where.

    hit = rasterize_triangles(vertices, faces, viewmat, K, width, height)
    hit.face [H, W] int32 (-1: background), hit.bary [H, W, 3] perspective-correct, hit.depth [H, W]

Cameras follow the project's tensor convention (world-to-camera OpenCV `viewmat`, pixel
intrinsics `K` with pixel centres at +0.5), so a mesh renders from exactly the cameras its splats
were fitted to. Used to score meshes at held-out views (an unlit render is the texture looked up
at the visible surface point), to render ground-truth meshes in tests, and for visibility tests.
`render_unlit` supersamples and box-filters, so silhouettes are anti-aliased like a renderer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np


@dataclass
class Hits:
    face: np.ndarray  # [H, W] int32, index of the visible face, -1 where no face
    bary: np.ndarray  # [H, W, 3] float64 perspective-correct barycentrics of the visible point
    depth: np.ndarray  # [H, W] float64 camera-space z of the visible point (inf where no face)


def rasterize_triangles(
    vertices: np.ndarray,  # [V, 3] world
    faces: np.ndarray,  # [F, 3] int
    viewmat: np.ndarray,  # [4, 4] world-to-camera, OpenCV axes
    K: np.ndarray,  # [3, 3] pixel intrinsics, pixel centres at +0.5
    width: int,
    height: int,
    near: float = 1e-3,
) -> Hits:
    """Nearest face per pixel centre; faces are two-sided; faces crossing the near plane are skipped."""
    v = np.asarray(vertices, np.float64)
    cam = v @ np.asarray(viewmat, np.float64)[:3, :3].T + np.asarray(viewmat, np.float64)[:3, 3]  # [V, 3]
    face = np.full((height, width), -1, np.int32)
    bary = np.zeros((height, width, 3), np.float64)
    depth = np.full((height, width), np.inf, np.float64)
    _raster(cam, np.ascontiguousarray(faces, np.int64), np.asarray(K, np.float64), near, face, bary, depth)
    return Hits(face, bary, depth)


@numba.njit(nogil=True, cache=True)
def _raster(cam, faces, K, near, out_face, out_bary, out_depth):  # pragma: no cover - compiled
    H, W = out_face.shape
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    for f in range(faces.shape[0]):
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        za, zb, zc = cam[a, 2], cam[b, 2], cam[c, 2]
        if za < near or zb < near or zc < near:
            continue
        ax, ay = fx * cam[a, 0] / za + cx, fy * cam[a, 1] / za + cy
        bx, by = fx * cam[b, 0] / zb + cx, fy * cam[b, 1] / zb + cy
        qx, qy = fx * cam[c, 0] / zc + cx, fy * cam[c, 1] / zc + cy
        area = (bx - ax) * (qy - ay) - (by - ay) * (qx - ax)
        if abs(area) < 1e-12:
            continue
        x0 = max(0, int(np.floor(min(ax, bx, qx) - 0.5)))
        x1 = min(W - 1, int(np.ceil(max(ax, bx, qx) - 0.5)))
        y0 = max(0, int(np.floor(min(ay, by, qy) - 0.5)))
        y1 = min(H - 1, int(np.ceil(max(ay, by, qy) - 0.5)))
        for y in range(y0, y1 + 1):
            py = y + 0.5
            for x in range(x0, x1 + 1):
                px = x + 0.5
                # Screen-space barycentrics (edge functions), either winding.
                w0 = ((bx - px) * (qy - py) - (by - py) * (qx - px)) / area
                w1 = ((qx - px) * (ay - py) - (qy - py) * (ax - px)) / area
                w2 = 1.0 - w0 - w1
                if w0 < -1e-9 or w1 < -1e-9 or w2 < -1e-9:
                    continue
                # Perspective-correct: interpolate 1/z.
                p0, p1, p2 = w0 / za, w1 / zb, w2 / zc
                inv_z = p0 + p1 + p2
                z = 1.0 / inv_z
                if z < out_depth[y, x]:
                    out_depth[y, x] = z
                    out_face[y, x] = f
                    out_bary[y, x, 0] = p0 * z
                    out_bary[y, x, 1] = p1 * z
                    out_bary[y, x, 2] = p2 * z


def bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Sample an [S, S, D] texture at glTF UVs [..., 2] (v = 0 is the top row), clamped at the edges."""
    S_v, S_u = texture.shape[:2]
    x = np.clip(uv[..., 0] * S_u - 0.5, 0, S_u - 1)
    y = np.clip(uv[..., 1] * S_v - 0.5, 0, S_v - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, S_u - 1), np.minimum(y0 + 1, S_v - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    t = texture.astype(np.float64)
    top = t[y0, x0] * (1 - fx) + t[y0, x1] * fx
    bottom = t[y1, x0] * (1 - fx) + t[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def render_unlit(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    shade: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],  # (face [P], bary [P,3], points [P,3]) -> rgb [P,3]
    viewmat: np.ndarray,  # [4, 4]
    K: np.ndarray,  # [3, 3]
    width: int,
    height: int,
    supersample: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Straight colour [H, W, 3] and coverage alpha [H, W, 1], box-filtered from `supersample`^2 samples."""
    s = int(supersample)
    Ks = np.asarray(K, np.float64).copy()
    Ks[:2] *= s  # pixel centres at +0.5 stay at +0.5 on the finer grid
    hit = rasterize_triangles(vertices, faces, viewmat, Ks, width * s, height * s)
    covered = hit.face >= 0
    rgb = np.zeros((height * s, width * s, 3))
    if covered.any():
        f, w = hit.face[covered], hit.bary[covered]
        points = np.einsum("pk,pkd->pd", w, np.asarray(vertices, np.float64)[np.asarray(faces)[f]])
        rgb[covered] = shade(f, w, points)
    coverage = covered.reshape(height, s, width, s).mean(axis=(1, 3))[..., None]
    summed = (rgb * covered[..., None]).reshape(height, s, width, s, 3).sum(axis=(1, 3))
    count = covered.reshape(height, s, width, s).sum(axis=(1, 3))[..., None]
    colour = summed / np.maximum(count, 1)
    return colour, coverage


def uv_texture_shader(faces: np.ndarray, uvs: np.ndarray, texture: np.ndarray) -> Callable:
    """Shader for a UV-textured mesh: bilinear texture lookup at the interpolated UV, in [0, 1]."""
    texture01 = np.asarray(texture, np.float64) / (255.0 if texture.dtype == np.uint8 else 1.0)

    def shade(face: np.ndarray, bary: np.ndarray, points: np.ndarray) -> np.ndarray:
        uv = np.einsum("pk,pkd->pd", bary, uvs[faces[face]])
        return bilinear(texture01[..., :3], uv)

    return shade


def vertex_color_shader(faces: np.ndarray, colors: np.ndarray) -> Callable:
    """Shader for per-vertex colours [V, 3] (uint8 or [0, 1] floats), interpolated."""
    colors01 = np.asarray(colors, np.float64) / (255.0 if colors.dtype == np.uint8 else 1.0)

    def shade(face: np.ndarray, bary: np.ndarray, points: np.ndarray) -> np.ndarray:
        return np.einsum("pk,pkd->pd", bary, colors01[faces[face]][..., :3])

    return shade
