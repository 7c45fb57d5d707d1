"""Stages 1-2 of meshing: a scalar field around the splats, and its iso-surface by marching cubes.

Three methods (`mesh.method`), measured against each other in bench/bench_mesh_fidelity.py
(docs/benchmarks.md):

- ``"hull"`` (default): the fitted views' silhouettes, carved further where the splats' rendered
  depth shows space (`hull.py`). A fit's silhouettes are right (mask IoU 0.98+) where its depth
  is not, so this follows the object best: F-score median 0.85 on the nine benchmark objects,
  against 0.57 for the density surface. Needs the views; without them (`im3d mesh` on a PLY)
  meshing falls back to "density".
- ``"density"``: the opacity-weighted Gaussian density, locally normalised, at a fixed share of
  its local peak (`density.py`); optionally snapped onto the density ridge afterwards.
- ``"tsdf"``: depth rendered from the splats at the fitted views and at extra views around the
  object, fused into a truncated signed distance field, space-carved with the fitted views' masks
  (`tsdf.py`). The fits' depth lies behind the true surface, and views from where no input view
  was see through what the fit never constrained, so it lost on every measured object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import mcubes
import numpy as np

from im3d.config import MeshConfig
from im3d.errors import check_cancel
from im3d.mesh.cleanup import drop_degenerate
from im3d.mesh.density import (
    DensityGrid,
    GaussianArrays,
    evaluate_density,
    fill_cavities,
    normalise_locally,
    typical_peak_density,
)
from im3d.mesh.errors import MeshingError

if TYPE_CHECKING:
    from im3d.mesh.hull import Silhouettes  # the type only: hull is imported where it is used

# Density below this share of the typical peak never counts as surface, however faint the
# neighbourhood: keeps the tails of floaters and empty space out of the local normalisation.
NORMALISATION_FLOOR = 0.2

Progress = Callable[[float, str], None]


def extract_surface(
    splats: dict,
    gaussians: GaussianArrays,
    cfg: MeshConfig,
    views=None,  # cameras + masks the splats were fitted to (`.cameras`, `.masks`), or None
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    lap: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, DensityGrid, float, Silhouettes | None]:
    """vertices [V, 3] (world), faces [F, 3] (outward), the field's grid, the iso-level used and,
    for the hull, the silhouettes it was cut from (`hull.Silhouettes`; None otherwise).

    `progress` fractions run 0..1 over these two stages.
    """
    report = progress or (lambda f, m: None)
    lap = lap or (lambda name: None)
    cameras = getattr(views, "cameras", None) if views is not None else None
    masks = getattr(views, "masks", None) if views is not None else None
    field_progress = lambda f, m: report(0.8 * f, f"meshing: {m}")  # noqa: E731
    silhouettes = None
    if cfg.method in ("hull", "tsdf"):  # view-based fields: inside > 0, iso-level 0
        if cfg.method == "hull":
            from im3d.mesh.hull import carve_field

            values, grid, silhouettes = carve_field(
                splats, gaussians, cfg.grid_resolution, cameras, masks, cfg.depth_margin, cfg.flat_underside, cfg.open_hollows, cfg.close_overhangs, cancel=cancel, progress=field_progress
            )  # fmt: skip
            empty = "no point is inside every view's mask: nothing to mesh"
        else:
            from im3d.mesh.tsdf import fuse_splat_depth

            values, grid = fuse_splat_depth(
                splats, gaussians, cfg.grid_resolution, cameras, masks if cfg.carve_with_masks else None,
                cfg.extra_views, cfg.truncation_voxels, cancel=cancel, progress=field_progress,
            )  # fmt: skip
            empty = "the splats render no surface from any view (every pixel is empty): nothing to mesh"
        iso = 0.0
        if not float(values.max()) > iso:
            raise MeshingError("no_surface", empty)
    else:
        report(0.0, "meshing: density grid")
        grid = evaluate_density(gaussians, cfg.grid_resolution, cancel=cancel, progress=field_progress)
        values = grid.values.copy()
        if cfg.threshold > 0:
            iso = cfg.threshold  # an absolute density level, as the user asked
        else:
            peak = typical_peak_density(grid, gaussians)
            if not peak > 0:
                raise MeshingError("no_surface", "the splats' density is zero at their own centres: nothing to mesh")
            normalise_locally(values, NORMALISATION_FLOOR * peak)
            iso = cfg.threshold_fraction
        if not float(values.max()) > iso:
            raise MeshingError(
                "no_surface",
                f"no density reaches the iso-level {iso:.3g} (max {float(values.max()):.3g}); lower mesh.threshold",
            )
    lap("field")

    check_cancel(cancel)
    report(0.8, "meshing: marching cubes")
    if cfg.fill_cavities:
        fill_cavities(values, iso)
    # Close the surface where it meets the grid's border (the density grid's margin is empty by
    # construction; a fused field can be "inside" up to the border where no view saw past it).
    values[[0, -1], :, :] = values[:, [0, -1], :] = values[:, :, [0, -1]] = min(float(values.min()), iso - 1.0)
    vertices_ijk, faces = mcubes.marching_cubes(values, iso)
    if len(faces) == 0:
        raise MeshingError("no_surface", f"marching cubes found no surface at iso-level {iso:.3g}")
    vertices = grid.to_world(vertices_ijk)
    faces = drop_degenerate(faces.astype(np.int64))
    lap("marching_cubes")
    report(1.0, "meshing: surface extracted")
    return vertices, faces, grid, float(iso), silhouettes
