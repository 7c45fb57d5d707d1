"""What every rasterizer backend shares: gsplat's compositing constants, the error type and the
input contract of a compositing backend (``composite_cpu`` / ``composite_torch``).

This module imports nothing from the other `raster` modules, so each of them can import it
without a cycle.
"""

from __future__ import annotations

from torch import Tensor

# Same constants as gsplat's kernels (Common.h, RasterizeToPixels3DGSFwd.cu).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_THRESHOLD = 1e-4
MAX_EXTEND = 3.33  # the radius in standard deviations for fully opaque Gaussians
TILE_SIZE = 16


class RasterizerError(ValueError):
    """Bad rasterizer input or an impossible backend request; the message says what to do."""


def check_composite_inputs(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2] int32, 0 where culled
    depths: Tensor,  # [C, N]
) -> tuple[int, int, int]:
    """The shapes a compositing backend receives from the projection; returns ``(C, N, D)``.

    A programming error if they disagree (the front end has checked the user's inputs), hence
    assertions rather than `RasterizerError`.
    """
    C, N, D = colors.shape
    assert means2d.shape == (C, N, 2), means2d.shape
    assert conics.shape == (C, N, 3), conics.shape
    assert opacities.shape == (C, N), opacities.shape
    assert radii.shape == (C, N, 2), radii.shape
    assert depths.shape == (C, N), depths.shape
    return C, N, D
