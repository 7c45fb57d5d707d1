"""Splats sampled on a known surface: ground truth for meshing tests and benchmarks.

Until fitted splats exist, this is how the meshing stage is measured: flat, opaque Gaussians
tangent to a mesh, the way fitted 3DGS surfaces look, coloured by a function of position.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import trimesh

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
