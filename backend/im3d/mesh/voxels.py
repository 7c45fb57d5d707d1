"""Small voxel-grid and camera helpers shared by the hull's steps."""

from __future__ import annotations

import torch


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """[X, Y, Z] bool: true where the mask or any of its 26 neighbours is (one axis at a time)."""
    out = mask.clone()
    for axis in range(3):
        n = out.shape[axis]
        grown = out.clone()
        grown.narrow(axis, 1, n - 1).logical_or_(out.narrow(axis, 0, n - 1))
        grown.narrow(axis, 0, n - 1).logical_or_(out.narrow(axis, 1, n - 1))
        out = grown
    return out


def project(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points [P, 3] -> camera z, pixel u, v, each [P] (pixel centres at +0.5)."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    return z, K[0, 0] * cam[:, 0] / z.clamp_min(1e-9) + K[0, 2], K[1, 1] * cam[:, 1] / z.clamp_min(1e-9) + K[1, 2]


def camera_centres(viewmats: torch.Tensor) -> torch.Tensor:
    """[C, 3] where the cameras of world-to-camera matrices [C, 4, 4] are: -R^T t."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -(R.transpose(1, 2) @ t[..., None])[..., 0]


def across(axis: torch.Tensor) -> torch.Tensor:
    """[3, 2] two orthonormal directions across the unit vector `axis` [3] (any pair)."""
    first = torch.linalg.svd(torch.eye(3) - torch.outer(axis, axis)).U[:, 0]
    return torch.stack([first, torch.linalg.cross(axis, first)], dim=-1)
