"""Splats -> textured mesh: a surface field, marching cubes, cleanup, UV atlas, albedo bake, GLB.

    result = mesh_from_splats(splats, config.mesh, progress, cancel)   # MeshResult
    export_glb(result, "mesh.glb")
    report = mesh_ply_to_glb("splats.ply", "mesh.glb", config)         # what `im3d mesh` calls

Stages (each reports progress and checks `cancel()`):
  1. field     mesh.method "hull" (default): the fitted views' silhouettes (their masks, or the
               splats where they are near-opaque) carved further where the splats' rendered depth
               shows space (hull.py), undersides no view sees closed (overhangs.py) and hidden
               hollows opened (hollows.py); without views it falls back to "density": Gaussian density
               (density.py); "tsdf": splat depth fused into a TSDF (tsdf.py)
  2. surface   marching cubes (PyMCubes) on that field, outward normals (surface.py)
  3. cleanup   drop floaters, Taubin smoothing and low-pass fairing (thin parts held), decimate to the face budget, (hull) outlines moved onto the views' silhouettes (outlines.py) and the surface pulled in to the views' depth less its lag (depth_fit.py), (density only: snap), unfold folds
  4. texture   UV atlas (facing charts packed by xatlas), albedo back-projected from the views
               (bake_views.py), the splats' colours where no view sees the surface
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from im3d.config import Config, MeshConfig
from im3d.errors import Cancelled, check_cancel
from im3d.mesh.bake_views import ViewImages, ViewSource
from im3d.mesh.cleanup import (
    decimate,
    drop_degenerate,
    fair_surface,
    face_components,
    mesh_statistics,
    neighbour_average,
    relax_folds,
    remove_small_components,
    snap_to_ridge,
    taubin_smooth,
    thin_vertices,
    vertex_normals,
)
from im3d.mesh.density import GaussianArrays, quats_to_rotations
from im3d.mesh.depth_fit import fit_depth
from im3d.mesh.errors import MeshingError
from im3d.mesh.gltf import write_glb
from im3d.mesh.outlines import fit_outlines
from im3d.mesh.surface import extract_surface
from im3d.mesh.texture import bake_albedo, splat_colors_at, unwrap

__all__ = [
    "Cancelled",
    "MeshReport",
    "MeshResult",
    "MeshingError",
    "ViewImages",
    "export_glb",
    "mesh_from_splats",
    "mesh_ply_to_glb",
    "splats_to_gaussians",
]

SH_C0 = 0.28209479177387814
# Splats fainter than this everywhere are "nothing there" (sigmoid of the logit opacity).
MIN_VISIBLE_OPACITY = 1e-3

Progress = Callable[[float, str], None]


@dataclass
class MeshReport:
    faces: int
    vertices: int
    components: int
    watertight: bool
    removed_components: int
    grid_shape: tuple[int, int, int]
    voxel_size: float
    iso_level: float
    textured: bool
    texture_size: int
    charts: int = 0
    uv_coverage: float = 0.0
    uv_overlap_texels: int = 0
    mean_snap_distance: float = 0.0
    depth_lag: float = 0.0  # hull: how far the splats' rendered depth lies behind the outlines, along the normal (world units; 0: not measured)
    surface_method: str = "density"  # the surface method that ran ("hull" falls back to "density" without views)
    texture_source: str = "splats"  # "views": back-projected from the job's views; "splats": splat colours
    view_texels: float = 0.0  # share of covered texels coloured wholly by the views
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MeshResult:
    vertices: np.ndarray  # [V, 3] world frame (Z up), float64
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    normals: np.ndarray  # [V, 3] unit, outward
    uvs: np.ndarray | None  # [V, 2] glTF convention, when textured
    texture: np.ndarray | None  # [S, S, 3] uint8 albedo, when textured
    vertex_colors: np.ndarray | None  # [V, 3] uint8, the fallback when not textured
    report: MeshReport


def _mesh_config(config: Config | MeshConfig) -> MeshConfig:
    return config.mesh if isinstance(config, Config) else config


def splats_to_gaussians(splats: dict) -> GaussianArrays:
    """Check a splat dict and activate it into float64 numpy arrays; `MeshingError` when unusable."""
    names = ("means", "quats", "scales", "opacities", "sh0")
    missing = [n for n in names if n not in splats]
    if missing:
        raise MeshingError("invalid_splats", f"the splats lack {', '.join(missing)} (expected {', '.join(names)})")
    arrays = {}
    for n in names:
        value = splats[n]
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64).numpy()
        arrays[n] = np.asarray(value, dtype=np.float64)
    N = arrays["means"].shape[0] if arrays["means"].ndim == 2 else -1
    expected = {"means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,), "sh0": (N, 1, 3)}
    for n, shape in expected.items():
        if arrays[n].shape != shape:
            raise MeshingError("invalid_splats", f"splats['{n}'] has shape {arrays[n].shape}, expected {shape}")
    if N == 0:
        raise MeshingError("no_surface", "the splats are empty (0 Gaussians): there is no surface to mesh")
    for n in names:
        bad = ~np.isfinite(arrays[n])
        if bad.any():
            raise MeshingError(
                "invalid_splats",
                f"splats['{n}'] holds {int(bad.sum())} NaN/infinite values: the fit diverged; refit with a lower learning rate",
            )
    opacities = 1.0 / (1.0 + np.exp(-arrays["opacities"]))
    if opacities.max() < MIN_VISIBLE_OPACITY:
        raise MeshingError(
            "no_surface", f"all {N} Gaussians are transparent (max opacity {opacities.max():.2g}): nothing to mesh"
        )
    if np.abs(arrays["quats"]).sum(1).min() == 0:
        raise MeshingError("invalid_splats", "some Gaussians have an all-zero rotation quaternion")
    return GaussianArrays(
        means=arrays["means"],
        rotations=quats_to_rotations(arrays["quats"]),
        scales=np.exp(np.clip(arrays["scales"], -30.0, 30.0)),
        opacities=opacities,
        rgb=np.clip(0.5 + SH_C0 * arrays["sh0"][:, 0, :], 0.0, 1.0),
    )


def mesh_from_splats(
    splats: dict,
    config: MeshConfig | Config | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    views: ViewSource | None = None,
) -> MeshResult:
    """Splats (a dict of tensors, any device) -> a cleaned, textured mesh in the splats' frame.

    `views` (posed images with `.cameras`, `.images`, `.masks`: the job's input views or its last
    diffused frames) are back-projected into the texture where they see the surface; without
    them, or with mesh.texture_from_views off, the texture comes from the splats' colours.
    """
    cfg = _mesh_config(config) if config is not None else MeshConfig()
    report_progress = progress or (lambda fraction, message: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    # 1-2. Surface: a field around the splats (the views' hull, fused rendered depth, or density), marching cubes.
    gaussians = splats_to_gaussians(splats)
    if cfg.method == "hull" and (getattr(views, "cameras", None) is None or getattr(views, "masks", None) is None):
        cfg = dataclasses.replace(cfg, method="density")  # splats alone (`im3d mesh`): no silhouettes to carve
    vertices, faces, grid, iso, silhouettes = extract_surface(
        splats, gaussians, cfg, views, lambda f, m: report_progress(0.45 * f, m), cancel, lap
    )

    # 3. Cleanup.
    check_cancel(cancel)
    report_progress(0.45, "meshing: cleanup and decimation")
    # Small pieces of a density or TSDF surface are the splats' floaters. Every piece of the views'
    # hull lies inside every view's silhouette: a twig that marching cubes cut off its branch, not
    # a floater (docs/benchmarks.md, "A fifth set, never tuned on, and thin branches"); it keeps as
    # many as the face budget holds (a closed piece needs 4 faces), the largest.
    if cfg.method == "hull":
        vertices, faces, removed = remove_small_components(vertices, faces, 0.0, max_components=cfg.face_budget // 4)
    else:
        vertices, faces, removed = remove_small_components(vertices, faces, cfg.min_component_fraction)
    components, _ = face_components(len(vertices), faces)
    if cfg.face_budget < 4 * components:
        raise MeshingError(
            "impossible_budget",
            f"a face budget of {cfg.face_budget} cannot hold {components} closed components "
            f"(at least {4 * components} faces); raise mesh.face_budget or mesh.min_component_fraction",
        )
    # Smoothed on marching cubes' regular triangles, before decimation: smoothing the decimated
    # mesh's long thin triangles folds them (dark specks in Blender).
    average = neighbour_average(vertices, faces)  # built once: both passes move vertices, not edges
    vertices = taubin_smooth(vertices, faces, cfg.smooth_iterations, cancel, average=average)
    held = thin_vertices(vertices, faces, grid, iso)
    vertices = fair_surface(vertices, faces, cfg.fair_iterations, held, cancel, average)
    lap("smooth")
    vertices, faces = decimate(vertices, faces, cfg.face_budget)
    lap("decimate")
    if cfg.fit_outlines and silhouettes is not None:
        # On the decimated mesh: a tenth of marching cubes' faces at grid 256 to rasterise per
        # view, and measured as good as before smoothing (docs/benchmarks.md, "Outlines").
        report_progress(0.5, "meshing: fitting the outlines to the views")
        vertices = fit_outlines(vertices, faces, silhouettes.cameras, silhouettes.silhouettes, cancel)
        lap("outlines")
    depth_lag = 0.0
    if cfg.fit_depth and silhouettes is not None:
        # After the outlines: their vertices lie on the true surface and measure the depth's lag.
        report_progress(0.55, "meshing: fitting the surface to the views' depth")
        vertices, lag = fit_depth(vertices, faces, silhouettes.cameras, silhouettes.silhouettes, silhouettes.depths, cancel)
        depth_lag = lag if np.isfinite(lag) else 0.0
        lap("depth_fit")
    check_cancel(cancel)
    snap_mean = 0.0
    if cfg.snap_to_splats and cfg.method == "density":  # the ridge is a density notion
        vertices, snap_mean = snap_to_ridge(vertices, faces, grid)
    faces = drop_degenerate(faces)
    vertices = relax_folds(vertices, faces)
    normals = vertex_normals(vertices, faces)
    stats = mesh_statistics(vertices, faces)
    lap("smooth")
    grid_shape, voxel_size = tuple(int(n) for n in grid.values.shape), float(grid.voxel)
    del grid

    # 4. Texture.
    check_cancel(cancel)
    report_progress(0.6, "meshing: UV atlas")
    blur = 0.5 * (np.percentile(gaussians.scales.max(1), 50) if len(gaussians.scales) else 0.0)
    uvs = texture = vertex_colors = None
    charts, coverage, overlaps = 0, 0.0, 0
    texture_source, view_texels = "splats", 0.0
    if cfg.bake_texture:
        uv_mesh = unwrap(vertices, faces, cfg.texture_size, cfg.texture_padding)
        lap("uv_unwrap")
        check_cancel(cancel)
        report_progress(0.75, "meshing: baking the albedo texture")
        normals = normals[uv_mesh.source_vertex]
        texture, bake_stats = bake_albedo(
            uv_mesh, gaussians, cfg.texture_size, blur, cancel=cancel,
            views=views if cfg.texture_from_views else None, normals=normals,
            progress=lambda f, m: report_progress(0.75 + 0.25 * f, f"meshing: {m}"),
        )  # fmt: skip
        texture_source, view_texels = bake_stats["texture_source"], bake_stats.get("view_texels", 0.0)
        vertices, faces, uvs = uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs
        charts, coverage, overlaps = uv_mesh.charts, bake_stats["uv_coverage"], bake_stats["uv_overlap_texels"]
        lap("bake")
    else:
        rgb = splat_colors_at(vertices, gaussians, blur, cancel=cancel)
        vertex_colors = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
        lap("bake")

    report = MeshReport(
        faces=stats["faces"],
        vertices=stats["vertices"],
        components=stats["components"],
        watertight=stats["watertight"],
        removed_components=removed,
        grid_shape=grid_shape,
        voxel_size=voxel_size,
        iso_level=float(iso),
        surface_method=cfg.method,
        textured=texture is not None,
        texture_size=int(cfg.texture_size) if texture is not None else 0,
        charts=charts,
        uv_coverage=coverage,
        uv_overlap_texels=overlaps,
        mean_snap_distance=snap_mean,
        depth_lag=depth_lag,
        texture_source=texture_source,
        view_texels=view_texels,
        stage_seconds=seconds,
    )
    report_progress(1.0, f"meshing: done, {report.faces} faces")
    return MeshResult(vertices, faces, normals, uvs, texture, vertex_colors, report)


def export_glb(result: MeshResult, path: str | Path) -> None:
    """Write the mesh as a .glb (Y up on disk, PBR baseColor texture), atomically."""
    if len(result.faces) == 0:
        raise MeshingError("no_surface", "refusing to write an empty mesh")
    write_glb(
        path,
        vertices=result.vertices,
        faces=result.faces,
        normals=result.normals,
        uvs=result.uvs,
        texture=result.texture,
        vertex_colors=result.vertex_colors,
    )


def mesh_ply_to_glb(
    ply_path: str | Path,
    out_path: str | Path,
    config: Config | MeshConfig | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> MeshReport:
    """`im3d mesh SPLATS.ply --out mesh.glb`: read 3DGS splats, mesh them, write the GLB."""
    from im3d.splats.ply import PlyError, read_ply

    try:
        splats = read_ply(ply_path)
    except PlyError as error:
        raise MeshingError("invalid_splats", str(error)) from None
    result = mesh_from_splats(splats, config, progress, cancel)
    export_glb(result, out_path)
    return result.report
