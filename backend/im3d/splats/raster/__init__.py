"""Gaussian-splat rasterizer: `rasterize` with gsplat's signature on every device.

Layout (each module imports only those listed before it, so there is no import cycle):

- `common.py`: gsplat's compositing constants, `RasterizerError`, the compositing input contract;
- `project.py`: EWA projection and SH colours (torch, autograd), for the two backends below;
- `cpu.py`: ``"cpu"`` backend, numba tiles with a hand-written backward pass; also `bin_tiles`
  and `run_on_threads`, which the TSDF depth renderer reuses;
- `torch_ref.py`: ``"torch"`` backend, plain-PyTorch compositing, the reference;
- `cuda_gsplat.py`: ``"gsplat"`` backend, a thin call of `gsplat.rasterization` on CUDA;
- `frontend.py`: `rasterize` (checks inputs, picks the backend) and `pick_backend`.
"""

from im3d.splats.raster.common import RasterizerError
from im3d.splats.raster.frontend import BACKENDS, RENDER_MODES, BackendName, pick_backend, rasterize

__all__ = ["BACKENDS", "RENDER_MODES", "BackendName", "RasterizerError", "pick_backend", "rasterize"]
