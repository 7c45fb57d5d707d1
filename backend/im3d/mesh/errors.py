"""The meshing stage's user-facing error."""

from __future__ import annotations

from im3d.errors import Im3dError


class MeshingError(Im3dError, ValueError):
    """Meshing cannot produce a usable mesh; `code` names the cause for clients.

    Codes: ``invalid_splats`` (wrong shapes, NaN/inf values), ``no_surface`` (empty or fully
    transparent splats, threshold above every density), ``degenerate_grid`` (the splats span no
    volume), ``impossible_budget`` (the face budget cannot hold the mesh's components).
    """

    def __init__(self, code: str, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"
