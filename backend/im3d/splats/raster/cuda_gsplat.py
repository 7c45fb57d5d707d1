"""CUDA backend: a thin call of `gsplat.rasterization` in non-packed mode.

`gsplat.rasterization` is imported here only, inside the call, and only once `pick_backend` has
seen CUDA tensors on a machine with CUDA: loading it elsewhere can start a JIT compile of its
CUDA extension.
"""

from __future__ import annotations

from torch import Tensor

from im3d.splats.raster.common import RasterizerError


def rasterize_gsplat(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, K, 3] or [N, D]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, 3]
    render_mode: str = "RGB",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, dict]:
    try:
        from gsplat import rasterization
    except Exception as exc:  # a missing or uncompilable CUDA extension surfaces here
        raise RasterizerError(
            f"backend='gsplat' could not load gsplat ({type(exc).__name__}: {exc}); "
            "check that gsplat matches this torch/CUDA build, or use backend='torch'"
        ) from exc
    colors_out, alphas, info = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, backgrounds=backgrounds, render_mode=render_mode,
    )  # fmt: skip
    info["backend"] = "gsplat"
    return colors_out, alphas, info
