"""Synthetic scenes with a known answer, for tests and benchmarks.

- `splats_on_surface`: flat, opaque Gaussians tangent to a mesh, the way fitted 3DGS surfaces
  look, coloured by a function of position: ground truth for the meshing stage;
- `splat_ball_views`: a coloured ball of Gaussians rendered from an orbit: targets for the fit;
- `ball_views_zip`: flat-shaded disc "renders" of a ball with their cameras, as the views zip a
  reconstruct job uploads (no rasterizer involved).
"""

from __future__ import annotations

from typing import Callable

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from im3d.cameras import Cameras, orbit_cameras, write_transforms
from im3d.splats.model import activated, make_splats
from im3d.splats.raster import rasterize

SH_C0 = 0.28209479177387814


def _quats_z_to(normals: np.ndarray) -> np.ndarray:
    """wxyz quaternions rotating +z onto each unit normal [N, 3]."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, normals)
    cos = normals @ z
    w = 1.0 + cos
    q = np.concatenate([w[:, None], axis], axis=1)
    opposite = w < 1e-8  # normal = -z: half-turn about x
    q[opposite] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def splats_on_surface(
    mesh: trimesh.Trimesh,
    num_splats: int,
    color_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    opacity: float = 0.95,
    thickness_ratio: float = 0.15,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`num_splats` disc-shaped Gaussians evenly spread over `mesh`'s surface.

    The in-plane size matches the spacing between samples so the discs overlap into a closed
    sheet; the normal size is `thickness_ratio` of that. `color_fn(points [P,3]) -> rgb [P,3]`.
    """
    rng = np.random.default_rng(seed)
    points, face_index = trimesh.sample.sample_surface_even(mesh, num_splats, seed=int(rng.integers(1 << 31)))
    if len(points) < num_splats:  # even sampling may return fewer; top up uniformly
        more, more_faces = trimesh.sample.sample_surface(mesh, num_splats - len(points), seed=int(rng.integers(1 << 31)))
        points, face_index = np.concatenate([points, more]), np.concatenate([face_index, more_faces])
    normals = mesh.face_normals[face_index]
    spacing = np.sqrt(mesh.area / num_splats)
    tangent = 1.2 * spacing
    scales = np.tile([tangent, tangent, thickness_ratio * tangent], (len(points), 1))
    rgb = np.full((len(points), 3), 0.7) if color_fn is None else np.clip(color_fn(points), 0.0, 1.0)
    N = len(points)
    return {
        "means": torch.from_numpy(points.astype(np.float32)),
        "quats": torch.from_numpy(_quats_z_to(normals).astype(np.float32)),
        "scales": torch.from_numpy(np.log(scales).astype(np.float32)),
        "opacities": torch.full((N,), float(np.log(opacity / (1 - opacity)))),
        "sh0": torch.from_numpy(((rgb - 0.5) / SH_C0).astype(np.float32))[:, None, :],
        "shN": torch.zeros(N, 0, 3),
    }


def stripes_color(points: np.ndarray) -> np.ndarray:
    """A smooth, position-dependent albedo that makes texture errors visible."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    return np.stack(
        [0.5 + 0.4 * np.sin(6.0 * x), 0.5 + 0.4 * np.sin(5.0 * y + 1.0), 0.5 + 0.4 * np.cos(7.0 * z)], axis=1
    )


def splat_ball_views(
    num_views: int = 8,
    size: int = 64,
    *,
    count: int = 300,
    radius: float = 0.35,
    scale: float = 0.06,
    opacity: float = 0.9,
    seed: int = 0,
) -> tuple[Cameras, torch.Tensor, torch.Tensor]:
    """A shell of `count` Gaussians (colour varying over it) rendered on black from an orbit.

    Returns the cameras, straight (not premultiplied) colours ``[V, H, W, 3]`` in [0, 1] (black
    where nothing was drawn) and alphas ``[V, H, W, 1]``.
    """
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(count, 3, generator=g)
    means = radius * direction / direction.norm(dim=-1, keepdim=True)
    rgb = (means / (2 * radius) + 0.5).clamp(0.05, 0.95)
    splats = make_splats(means, rgb, scale, opacity=opacity)
    cams = orbit_cameras(num_views, elevation_deg=15, radius=2.0, fov_deg=40, width=size)
    p = activated(splats)
    with torch.no_grad():
        colors, alphas, _ = rasterize(
            p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], cams.viewmats, cams.Ks, size, size,
            sh_degree=0, backgrounds=torch.zeros(num_views, 3), backend="cpu",
        )  # fmt: skip
    images = torch.where(alphas > 1e-6, colors / alphas.clamp_min(1e-6), torch.zeros_like(colors)).clamp(0, 1)
    return cams, images, alphas


def ball_views_zip(num_views: int = 4, size: int = 24, green_step: int = 30) -> bytes:
    """RGBA images of a centred ball (a flat disc, alpha is the mask), as a NeRF-synthetic zip.

    View ``i`` is coloured ``(200, 60 + green_step * i, 40)``, so the views disagree a little.
    """
    cameras = orbit_cameras(num_views, elevation_deg=15.0, radius=2.5, fov_deg=40.0, width=size)
    radius_px = float(cameras.Ks[0, 0, 0]) * 0.35 / 2.5
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= radius_px**2
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(num_views):
            rgba = np.zeros((size, size, 4), np.uint8)
            rgba[inside] = (200, 60 + green_step * i, 40, 255)
            png = io.BytesIO()
            Image.fromarray(rgba, "RGBA").save(png, format="PNG")
            archive.writestr(f"images/r_{i}.png", png.getvalue())
            paths.append(f"./images/r_{i}")
        write_transforms(Path(tmp) / "transforms.json", cameras, paths)
        archive.writestr("transforms.json", (Path(tmp) / "transforms.json").read_text())
    return buffer.getvalue()
