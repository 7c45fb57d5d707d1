"""Texture from the views: back-project the input images onto the mesh's UV atlas.

Splat colours are a blurred, noisy estimate of the surface colour (each texel averages the SH-DC
colour of whatever Gaussians lie near it, floaters and inner splats included). The views are the
colour itself, so every texel that some view sees takes its colour from the views:

  1. each view's depth map of the mesh itself (zbuffer.py), which decides visibility, and
     an "edge weight" map: 0 outside the object's mask or the mesh's coverage and at depth jumps,
     rising from EDGE_FLOOR to 1 over EDGE_PIXELS pixels inside, so silhouettes bleed no background;
  2. for each texel (its surface point and smooth normal) and each view: project, depth-test,
     sample the image (bilinear, alpha-weighted); its quality is the view's resolution on the
     surface there, cos(angle) * focal / depth;
  3. blend: weight = exp(SHARPNESS * (quality / best quality - 1)) * edge weight * grazing factor,
     a soft-max over the views that favours the best ones but changes continuously across the
     surface, so switching views leaves no seam; the texture stays a function of the 3D point
     and normal, so the two sides of a UV seam get the same colour.

Texels no view sees at a usable angle (their best view's grazing weight below MIN_WEIGHT) are
blended with the splat colour by the caller.

Colour: views are straight (not premultiplied) sRGB values in [0, 1], the glTF baseColor texture
is sRGB too, so values are copied without any gamma conversion.

    views = ViewImages(cameras, images, masks)       # or anything with these three attributes
    rgb, weight, stats = bake_from_views(points, normals, face_normals, vertices, faces, views, texel_size)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numba
import numpy as np
import torch
from scipy import ndimage

from im3d.cameras import Cameras
from im3d.errors import check_cancel
from im3d.mesh.zbuffer import rasterize_triangles

# Pixels over which a view's weight rises from EDGE_FLOOR at a silhouette / depth jump to 1 inside.
# The floor is above 0: a texel that every view sees near an edge still takes the views' colour.
EDGE_PIXELS = 3.0
EDGE_FLOOR = 1e-3
# Soft-max sharpness over the views' relative quality: a view at 90 % of the best quality gets
# exp(-1) of its weight. Higher = sharper but more visible view switches; lower = blurrier.
SHARPNESS = 10.0
# Views that see a surface more grazing than this cosine are ignored; up to GRAZING_FULL they
# fade in (grazing samples are blurred and the least trustworthy at silhouettes).
GRAZING_MIN, GRAZING_FULL = 0.08, 0.3
# A texel whose best view sees it more grazing than this (weight = the grazing fade-in of its best
# view, 1 = seen at GRAZING_FULL or better) is blended with the splat colour.
MIN_WEIGHT = 0.5
# Views are used at up to this many pixels per texel (finer only costs time and memory).
PIXELS_PER_TEXEL = 2.0
# ... and at most this many pixels over all views together (9 bytes each: RGBA, depth, edge weight),
# so a dataset of hundreds of large photos still bakes in bounded memory.
MAX_VIEW_PIXELS = 32_000_000
# Texels handled per numba call: bounds the scratch memory (chunk x views x 5 float32) and sets
# how often progress is reported and cancel is checked.
CHUNK_TEXELS = 1 << 16

Progress = Callable[[float, str], None]


class ViewSource(Protocol):
    cameras: Cameras
    images: torch.Tensor  # [C, H, W, 3] straight sRGB in [0, 1]
    masks: torch.Tensor  # [C, H, W, 1] in [0, 1]


@dataclass
class ViewImages:
    """Posed views to texture from (a MultiViewDataset or OrbitFrames works the same)."""

    cameras: Cameras
    images: torch.Tensor  # [C, H, W, 3] straight (not premultiplied) sRGB in [0, 1]
    masks: torch.Tensor  # [C, H, W, 1] in [0, 1]: alpha or foreground segmentation


# ----------------------------------------------------------------------------------------------
# Per-view maps


def _depth_jumps(depth: np.ndarray, fx: float) -> np.ndarray:
    """Pixels [H,W] next to a depth discontinuity (an occluding contour inside the silhouette)."""
    # A surface seen at 83 deg changes depth by ~8 pixels' footprint per pixel; more is a jump.
    finite = np.where(np.isfinite(depth), depth, 0.0)
    relative = max(0.03, 8.0 / fx)
    jumps = np.zeros(depth.shape, bool)
    for axis in (0, 1):
        d = np.diff(finite, axis=axis)
        near = np.minimum(np.delete(finite, -1, axis), np.delete(finite, 0, axis))
        jump = np.abs(d) > relative * np.maximum(near, 1e-9)
        if axis == 0:
            jumps[:-1] |= jump
            jumps[1:] |= jump
        else:
            jumps[:, :-1] |= jump
            jumps[:, 1:] |= jump
    return jumps


def edge_weights(depth: np.ndarray, mask: np.ndarray, fx: float) -> np.ndarray:
    """[H,W] float32: 0 off the object (mask < 0.5 or no mesh); on it, EDGE_FLOOR at silhouettes
    and depth jumps rising to 1 over EDGE_PIXELS pixels inside: where pixels are pure surface colour.

    Pixels at a depth jump keep the floor, not 0: the z-buffer labels such a pixel by its centre,
    and for a texel there that no other view sees, a slightly mixed colour beats the splats'.
    """
    inside = np.isfinite(depth) & (mask >= 0.5)
    clean = inside & ~_depth_jumps(depth, fx)
    if not clean.any():
        return np.where(inside, EDGE_FLOOR, 0.0).astype(np.float32)
    # Pixels on the image border count as edge too: what lies beyond is unknown.
    distance = ndimage.distance_transform_edt(np.pad(clean, 1, constant_values=False))[1:-1, 1:-1]
    ramp = np.clip((distance - 0.5) / EDGE_PIXELS, EDGE_FLOOR, 1.0)
    return np.where(inside, ramp, 0.0).astype(np.float32)


def view_scale(vertices: np.ndarray, cameras: Cameras, texel_size: float) -> float:
    """Resize factor (<= 1) so that views carry at most PIXELS_PER_TEXEL pixels per texel."""
    centre = vertices.mean(axis=0)
    viewmats = cameras.viewmats.detach().cpu().double().numpy()
    depth = viewmats[:, 2, :3] @ centre + viewmats[:, 2, 3]  # [C] camera z of the object's centre
    fx = cameras.Ks[:, 0, 0].detach().cpu().double().numpy()
    pixel_size = np.median(np.maximum(depth, 1e-9) / fx)  # world size of one pixel at the object
    return float(min(1.0, PIXELS_PER_TEXEL * pixel_size / max(texel_size, 1e-12)))


# ----------------------------------------------------------------------------------------------
# Back-projection


@numba.njit(parallel=True, cache=True, fastmath=True)
def _sample_views(points, normals, face_normals, viewmats, Ks, centres, depth, edge, rgba, tol_abs,
                  quality, weight, grazing, color):  # fmt: skip
    """Per texel and view: quality (0 = unseen), edge x grazing weight, grazing fade-in, sampled colour."""
    P = points.shape[0]
    C, H, W = depth.shape
    for p in numba.prange(P):
        for c in range(C):
            quality[p, c] = 0.0
            px, py, pz = points[p, 0], points[p, 1], points[p, 2]
            X0 = viewmats[c, 0, 0] * px + viewmats[c, 0, 1] * py + viewmats[c, 0, 2] * pz + viewmats[c, 0, 3]
            X1 = viewmats[c, 1, 0] * px + viewmats[c, 1, 1] * py + viewmats[c, 1, 2] * pz + viewmats[c, 1, 3]
            z = viewmats[c, 2, 0] * px + viewmats[c, 2, 1] * py + viewmats[c, 2, 2] * pz + viewmats[c, 2, 3]
            if z <= 1e-9:
                continue
            u = (Ks[c, 0, 0] * X0 + Ks[c, 0, 1] * X1) / z + Ks[c, 0, 2]
            v = Ks[c, 1, 1] * X1 / z + Ks[c, 1, 2]
            col = int(math.floor(u))
            row = int(math.floor(v))
            if col < 0 or row < 0 or col >= W or row >= H:
                continue
            dx = centres[c, 0] - points[p, 0]
            dy = centres[c, 1] - points[p, 1]
            dz = centres[c, 2] - points[p, 2]
            inv_len = 1.0 / math.sqrt(dx * dx + dy * dy + dz * dz)
            dx *= inv_len
            dy *= inv_len
            dz *= inv_len
            cos = normals[p, 0] * dx + normals[p, 1] * dy + normals[p, 2] * dz
            if cos <= GRAZING_MIN:
                continue
            # Visibility: the texel must be the surface the view's z-buffer holds at that pixel.
            # Within one triangle the depth changes by (z / f) * tan(angle) per pixel, and the
            # texel is up to ~0.7 pixel from the pixel centre the z-buffer sampled.
            cos_geom = max(abs(face_normals[p, 0] * dx + face_normals[p, 1] * dy + face_normals[p, 2] * dz), 0.1)
            tan_geom = math.sqrt(max(1.0 - cos_geom * cos_geom, 0.0)) / cos_geom
            if z > depth[c, row, col] + tol_abs + 1.0 * z / Ks[c, 0, 0] * tan_geom:
                continue
            # Bilinear, alpha-weighted: background pixels of straight-alpha images add nothing.
            x = min(max(u - 0.5, 0.0), W - 1.0)
            y = min(max(v - 0.5, 0.0), H - 1.0)
            x0 = min(int(x), W - 2) if W > 1 else 0
            y0 = min(int(y), H - 2) if H > 1 else 0
            fx = x - x0
            fy = y - y0
            acc_r = acc_g = acc_b = acc_a = e = 0.0
            for j in range(2):
                yy = min(y0 + j, H - 1)
                wy = fy if j == 1 else 1.0 - fy
                for i in range(2):
                    xx = min(x0 + i, W - 1)
                    wx = fx if i == 1 else 1.0 - fx
                    a = wx * wy * rgba[c, yy, xx, 3]
                    acc_r += a * rgba[c, yy, xx, 0]
                    acc_g += a * rgba[c, yy, xx, 1]
                    acc_b += a * rgba[c, yy, xx, 2]
                    acc_a += a
                    e += wx * wy * edge[c, yy, xx]
            # A texel right on a silhouette samples some object pixels: it counts, at the edge floor.
            if acc_a < 1e-3 * 255.0 or e <= 0.0:
                continue
            t = min(max((cos - GRAZING_MIN) / (GRAZING_FULL - GRAZING_MIN), 0.0), 1.0)
            quality[p, c] = cos * Ks[c, 0, 0] / z  # view pixels per unit of surface length
            grazing[p, c] = t * t * (3.0 - 2.0 * t)
            weight[p, c] = e * grazing[p, c]
            color[p, c, 0] = acc_r / (acc_a * 255.0)
            color[p, c, 1] = acc_g / (acc_a * 255.0)
            color[p, c, 2] = acc_b / (acc_a * 255.0)


@numba.njit(parallel=True, cache=True, fastmath=True)
def _blend(quality, weight, grazing, color, out_rgb, out_weight):
    """Soft-max over the views' relative quality, times their edge/grazing weights; out_weight is
    the best grazing fade-in among the views that see the texel (how much to trust the views)."""
    P, C = quality.shape
    for p in numba.prange(P):
        best = 0.0
        trust = 0.0
        for c in range(C):
            if quality[p, c] > 0.0:
                best = max(best, quality[p, c])
                trust = max(trust, grazing[p, c])
        total = r = g = b = 0.0
        if best > 0.0:
            for c in range(C):
                if quality[p, c] > 0.0:
                    w = weight[p, c] * math.exp(SHARPNESS * (quality[p, c] / best - 1.0))
                    total += w
                    r += w * color[p, c, 0]
                    g += w * color[p, c, 1]
                    b += w * color[p, c, 2]
        out_weight[p] = trust if total > 0.0 else 0.0
        if total > 0.0:
            out_rgb[p, 0] = r / total
            out_rgb[p, 1] = g / total
            out_rgb[p, 2] = b / total
        else:
            out_rgb[p, 0] = out_rgb[p, 1] = out_rgb[p, 2] = 0.0


def prepare_views(
    views: ViewSource,
    vertices: np.ndarray,  # [V, 3] the mesh, for the z-buffers
    faces: np.ndarray,  # [F, 3]
    texel_size: float,  # world size of one texel
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Resize views to what the texture needs; render each view's depth and edge-weight maps."""
    cameras, images, masks = views.cameras, views.images, views.masks
    C, H, W = images.shape[:3]
    if masks.shape != (C, H, W, 1) or len(cameras) != C:
        raise ValueError(f"views: {C} images {tuple(images.shape)}, masks {tuple(masks.shape)}, {len(cameras)} cameras")
    if (cameras.width, cameras.height) != (W, H):
        cameras = cameras.resized(W, H)
    scale = min(view_scale(vertices, cameras, texel_size), math.sqrt(MAX_VIEW_PIXELS / (C * H * W)))
    w, h = max(8, round(W * scale)), max(8, round(H * scale))
    if (w, h) != (W, H) and w < W:
        cameras = cameras.resized(w, h)
    else:
        w, h = W, H
    viewmats = cameras.viewmats.detach().cpu().double().numpy()
    Ks = cameras.Ks.detach().cpu().double().numpy()
    centres = cameras.centers().detach().cpu().double().numpy()
    rgba = np.empty((C, h, w, 4), np.uint8)
    depth = np.empty((C, h, w), np.float32)
    edge = np.empty((C, h, w), np.float32)
    for c in range(C):
        check_cancel(cancel)
        if (w, h) != (W, H):
            image = torch.cat([images[c], masks[c]], dim=-1).detach().cpu().float()  # [H, W, 4]
            image = torch.nn.functional.interpolate(
                image.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False
            )[0].permute(1, 2, 0).numpy()
        else:
            # numpy, not torch, for full-size views: tiny torch ops contend with numba's threads.
            image = np.concatenate([images[c].detach().cpu().numpy(), masks[c].detach().cpu().numpy()], axis=-1)
        rgba[c] = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        d = rasterize_triangles(vertices, faces, viewmats[c], Ks[c], w, h).depth
        depth[c] = d
        edge[c] = edge_weights(d, rgba[c, :, :, 3] / 255.0, float(Ks[c, 0, 0]))
    return {"viewmats": viewmats, "Ks": Ks, "centres": centres, "rgba": rgba, "depth": depth, "edge": edge,
            "width": w, "height": h}  # fmt: skip


def bake_from_views(
    points: np.ndarray,  # [P, 3] texel surface points
    normals: np.ndarray,  # [P, 3] unit smooth normals at the texels (outward)
    face_normals: np.ndarray,  # [P, 3] unit normals of the texels' triangles
    vertices: np.ndarray,  # [V, 3] the mesh (for visibility)
    faces: np.ndarray,  # [F, 3]
    views: ViewSource,
    texel_size: float,  # world size of one texel
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Colour [P,3] in [0,1] (sRGB, as the views) and the views' weight [P] in [0,1] (0: no view sees it)."""
    report = progress or (lambda fraction, message: None)
    report(0.0, f"texture: depth maps of {len(views.cameras)} views")
    prepared = prepare_views(views, vertices, faces, texel_size, cancel)
    C = prepared["rgba"].shape[0]
    radius = float(np.linalg.norm(vertices - vertices.mean(0), axis=1).max()) if len(vertices) else 1.0
    tol_abs = 2e-3 * radius  # float noise and the z-buffer's own discretisation
    P = len(points)
    rgb = np.zeros((P, 3))
    weight = np.zeros(P)
    chunk = max(1, min(CHUNK_TEXELS, P))
    quality = np.empty((chunk, C), np.float32)
    view_weight = np.empty((chunk, C), np.float32)
    grazing = np.empty((chunk, C), np.float32)
    color = np.empty((chunk, C, 3), np.float32)
    points = np.ascontiguousarray(points, np.float64)
    normals = np.ascontiguousarray(normals, np.float64)
    face_normals = np.ascontiguousarray(face_normals, np.float64)
    for start in range(0, P, chunk):
        check_cancel(cancel)
        stop = min(P, start + chunk)
        n = stop - start
        _sample_views(
            points[start:stop], normals[start:stop], face_normals[start:stop], prepared["viewmats"], prepared["Ks"],
            prepared["centres"], prepared["depth"], prepared["edge"], prepared["rgba"], tol_abs,
            quality[:n], view_weight[:n], grazing[:n], color[:n],
        )  # fmt: skip
        _blend(quality[:n], view_weight[:n], grazing[:n], color[:n], rgb[start:stop], weight[start:stop])
        report(0.2 + 0.8 * stop / P, f"texture: back-projecting {C} views, {stop}/{P} texels")
    stats = {
        "views": int(C),
        "view_resolution": [int(prepared["width"]), int(prepared["height"])],
        "texels_seen": float((weight > 0).mean()) if P else 0.0,
    }
    return rgb, weight, stats
