"""What every rasterizer backend shares: gsplat's compositing constants, the error type and what
a compositing backend receives (`ProjectedSplats`).

This module imports nothing from the other `raster` modules, so each of them can import it
without a cycle.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# Same constants as gsplat's kernels (Common.h, RasterizeToPixels3DGSFwd.cu).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_THRESHOLD = 1e-4
MAX_EXTEND = 3.33  # the radius in standard deviations for fully opaque Gaussians
TILE_SIZE = 16


class RasterizerError(ValueError):
    """Bad rasterizer input or an impossible backend request; the message says what to do."""


class ProjectedSplats(NamedTuple):
    """What the projection hands a compositing backend (``composite_cpu`` / ``composite_torch``)."""

    means2d: Tensor  # [C, N, 2] pixel positions, in the autograd graph
    conics: Tensor  # [C, N, 3] upper triangle of the inverse 2D covariance
    colors: Tensor  # [C, N, D] per-view colours (plus the depth channel for RGB+ED)
    opacities: Tensor  # [C, N] in [0, 1]
    radii: Tensor  # [C, N, 2] int32, 0 where culled
    depths: Tensor  # [C, N] camera-space z: the compositing order

    def checked_shape(self) -> tuple[int, int, int]:
        """``(C, N, D)``, asserting that the fields agree.

        A programming error if they do not (the front end has checked the user's inputs), hence
        assertions rather than `RasterizerError`.
        """
        C, N, D = self.colors.shape
        assert self.means2d.shape == (C, N, 2), self.means2d.shape
        assert self.conics.shape == (C, N, 3), self.conics.shape
        assert self.opacities.shape == (C, N), self.opacities.shape
        assert self.radii.shape == (C, N, 2), self.radii.shape
        assert self.depths.shape == (C, N), self.depths.shape
        return C, N, D
