"""Meshes from *fitted* splats follow the true surface: sphere, torus, thin-walled cup.

Ground truth is rendered from the real meshes (z-buffer rasterizer, 4x4 supersampled, unlit
procedural colour), the real fit loop runs on those views (few steps), and the mesh is scored
against the ground-truth surface (Chamfer-L1 and F-score in bounding-sphere radii), as in
bench/bench_mesh_fidelity.py but small. Thresholds are set from measured values with margin; the
density surface (`mesh.method="density"`) misses them on the same fits, so they can fail.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from im3d.cameras import MultiViewDataset, orbit_cameras
from im3d.config import MeshConfig, ReconConfig
from im3d.mesh import mesh_from_splats
from im3d.mesh.cleanup import face_components
from im3d.testing.synthetic import splats_on_surface, stripes_color
from im3d.mesh.zbuffer import render_unlit
from im3d.splats.fit import SplatFitter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_mesh import geometry_metrics  # noqa: E402

SIZE = 80  # image side: walls of the cup are ~2.5 pixels thick, as thin as a 128^2 view of a mug's
STEPS = 200
MESH = dict(method="hull", grid_resolution=96, face_budget=8000, bake_texture=False)


def cup() -> trimesh.Trimesh:
    """A cup (surface of revolution): outer radius 0.35, walls 4 cm, bottom 6 cm, 0.7 tall."""
    profile = np.array([[0.0, -0.35], [0.35, -0.35], [0.35, 0.35], [0.31, 0.35], [0.31, -0.29], [0.0, -0.29]])
    return trimesh.creation.revolve(profile, sections=96)


def rounded_box(half=(0.42, 0.3, 0.2), radius: float = 0.07) -> trimesh.Trimesh:
    """A box with rounded edges (the Minkowski sum of a box and a ball): each direction n of a
    fine sphere goes to the box's corner that way plus radius * n."""
    sphere = trimesh.creation.icosphere(subdivisions=4)
    inner = np.asarray(half) - radius
    vertices = np.sign(sphere.vertices) * inner + radius * sphere.vertices
    return trimesh.Trimesh(vertices, sphere.faces, process=False)


def bowl() -> trimesh.Trimesh:
    """A hemispherical bowl (surface of revolution): outer radius 0.5, walls 4 cm, rim at z 0.15."""
    angles = np.linspace(0.0, np.pi / 2, 24)
    outer = np.stack([0.5 * np.sin(angles), 0.15 - 0.5 * np.cos(angles)], axis=-1)  # bottom -> rim
    inner = np.stack([0.46 * np.sin(angles), 0.15 - 0.46 * np.cos(angles)], axis=-1)[::-1]  # rim -> bottom
    return trimesh.creation.revolve(np.concatenate([outer, inner]), sections=96)


def table() -> trimesh.Trimesh:
    """A table: a top 0.9 x 0.6, 6 cm thick, its underside at z 0.1, on four legs 7 cm square down
    to z -0.35 (the legs end at the underside: no faces inside the solid)."""
    top = trimesh.creation.box(extents=(0.9, 0.6, 0.06))
    top.apply_translation((0.0, 0.0, 0.13))
    legs = []
    for x in (-0.38, 0.38):
        for y in (-0.23, 0.23):
            leg = trimesh.creation.box(extents=(0.07, 0.07, 0.45))
            leg.apply_translation((x, y, -0.125))
            legs.append(leg)
    return trimesh.util.concatenate([top, *legs])


def hoop() -> trimesh.Trimesh:
    """A torus standing on its rim (a handle's loop): its hole's top faces down, seen by no view above."""
    ring = trimesh.creation.torus(major_radius=0.3, minor_radius=0.08, major_sections=96, minor_sections=32)
    ring.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    return ring


OBJECTS = {
    "bowl": bowl,
    "table": table,
    "hoop": hoop,
    "sphere": lambda: trimesh.creation.icosphere(subdivisions=4, radius=0.5),
    "torus": lambda: trimesh.creation.torus(major_radius=0.35, minor_radius=0.13, major_sections=96, minor_sections=32),
    "cup": cup,
    "rounded_box": rounded_box,
    "tall_box": lambda: rounded_box(half=(0.25, 0.2, 0.45), radius=0.04),
}
# Measured (see the module docstring): these leave margin over what the fits reach.
# Measured 2026-12-01 (same with 1 or 2 threads): Chamfer / F / normal consistency: sphere 0.0069 /
# 0.941 / 0.991, torus 0.0074 / 0.892 / 0.972, cup 0.028 / 0.610 / 0.933 (0.041 / 0.585 before its
# unseen underside was cut flat); the density surface on the same fits: sphere 0.072 / 0.197.
THRESHOLDS = {"sphere": (0.012, 0.88, 0.975), "torus": (0.014, 0.8, 0.95), "cup": (0.04, 0.56, 0.9)}  # (Chamfer-L1 max, F@0.02 min, normal consistency min)


def render_views(mesh: trimesh.Trimesh, elevations=(20.0, 50.0), per_ring: int = 8) -> MultiViewDataset:
    """Unlit renders of the mesh (stripes_color albedo) from orbits around it: the ground-truth views."""
    rings = [
        orbit_cameras(per_ring, elevation_deg=e, radius=1.7, fov_deg=40.0, width=SIZE, azimuth_start_deg=22.5 * r)
        for r, e in enumerate(elevations)
    ]
    cams = rings[0]
    for ring in rings[1:]:
        cams = type(cams)(torch.cat([cams.viewmats, ring.viewmats]), torch.cat([cams.Ks, ring.Ks]), SIZE, SIZE)
    images, masks = [], []
    for i in range(len(cams)):
        rgb, alpha = render_unlit(
            mesh.vertices, mesh.faces, lambda f, b, p: np.clip(stripes_color(p), 0, 1),
            cams.viewmats[i].numpy(), cams.Ks[i].numpy(), SIZE, SIZE,
        )  # fmt: skip
        images.append(rgb)
        masks.append(alpha)
    as_tensor = lambda a: torch.tensor(np.stack(a), dtype=torch.float32)  # noqa: E731
    return MultiViewDataset(cams, as_tensor(images), as_tensor(masks), [f"r_{i}" for i in range(len(cams))])


def contains(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> list[bool]:
    """Inside a closed mesh: generalised winding number > 1/2 (solid angles, Van Oosterom-Strackee)."""
    tri = vertices[faces][None] - points[:, None, None, :]  # [P, F, 3, 3]
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
    numerator = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
    denominator = la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", b, c) * la + np.einsum("pfi,pfi->pf", c, a) * lb
    winding = (2 * np.arctan2(numerator, denominator)).sum(axis=1) / (4 * np.pi)
    return [bool(w > 0.5) for w in winding]


@functools.lru_cache(maxsize=None)
def fitted(name: str):
    """(ground truth, views, fitted splats) of one object; cached, the fit is the expensive part."""
    gt = OBJECTS[name]()
    views = render_views(gt)
    config = ReconConfig(
        image_size=SIZE, steps=STEPS, init_points=2000, lpips_weight=0.0, l1_weight=1.0, views_per_step=4,
        init="visual_hull", densify_start=50, densify_every=50,
    )  # fmt: skip
    torch.manual_seed(0)
    fitter = SplatFitter(config, views.cameras, views.images, views.masks)
    fitter.fit(STEPS)
    splats = {k: v.detach().clone() for k, v in fitter.splats.items()}
    return gt, views, splats


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_fitted_splats_mesh_onto_the_true_surface(name):
    gt, views, splats = fitted(name)
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    assert result.report.surface_method == "hull"
    metrics = geometry_metrics(result.vertices, result.faces, gt, samples=30_000)
    max_chamfer, min_fscore, min_normals = THRESHOLDS[name]
    print(f"{name}: chamfer {metrics['chamfer']:.4f} F {metrics['fscore']:.3f} NC {metrics['normal_consistency']:.3f} faces {result.report.faces}")
    assert metrics["chamfer"] <= max_chamfer, metrics
    assert metrics["fscore"] >= min_fscore, metrics
    assert metrics["normal_consistency"] >= min_normals, metrics  # no pits or ridges the distances hide


def test_fitted_cup_is_open():
    """The fit's depth shows the cup's inside, so the hull is carved open there, walls and bottom
    kept; what no view sees of it (most of its floor, 64 cm down a 62 cm wide cup, even from 50°
    up: the hull left a cone there, peaking 27 cm above the floor) is opened too (mesh.open_hollows),
    down to a wall's thickness above the bottom (3 cm of the cup's 6)."""
    gt, views, splats = fitted("cup")
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    # Inside the cavity: outside the mesh; inside the wall and the bottom: inside it.
    inside = contains(result.vertices, result.faces, np.array([[0.0, 0.0, 0.05], [0.0, 0.0, -0.2], [0.33, 0.0, 0.0]]))
    assert list(inside) == [False, False, True], inside
    bottom = contains(result.vertices, result.faces, np.array([[0.0, 0.0, z] for z in (-0.345, -0.34, -0.335, -0.33)]))
    assert any(bottom), bottom


def test_without_views_meshing_falls_back_to_the_splats_density():
    """`im3d mesh` on a PLY alone has no silhouettes: the hull method falls back to the density surface."""
    gt, _, splats = fitted("sphere")
    result = mesh_from_splats(splats, MeshConfig(**MESH))
    assert result.report.surface_method == "density"
    metrics = geometry_metrics(result.vertices, result.faces, gt, samples=30_000)
    print(f"sphere without views: chamfer {metrics['chamfer']:.4f} F {metrics['fscore']:.3f}")
    assert metrics["chamfer"] <= 0.1 and metrics["fscore"] >= 0.12, metrics  # looser (see THRESHOLDS), but the same object


def _ideal(name: str, **rings):
    """(ground truth, views, splats lying exactly on its surface): what a perfect fit would give."""
    gt = OBJECTS[name]()
    return gt, render_views(gt, **rings), splats_on_surface(gt, 6000, color_fn=stripes_color)


def _with_and_without(name: str, option: str, **rings):
    """(ground truth, mesh with the defaults, mesh with `option` off) from ideal splats of `name`."""
    gt, views, splats = _ideal(name, **rings)
    on = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    off = mesh_from_splats(splats, MeshConfig(**{**MESH, option: False}), views=views)
    return gt, on, off


def test_hull_carves_a_concavity_the_splats_show():
    """Ideal splats of the cup: their depth shows the inside, so the hull is carved open there."""
    gt, views, splats = _ideal("cup")
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    inside = contains(result.vertices, result.faces, np.array([[0.0, 0.0, 0.05], [0.0, 0.0, 0.25], [0.33, 0.0, 0.0], [0.0, 0.0, -0.32]]))
    assert list(inside) == [False, False, True, True], inside
    metrics = geometry_metrics(result.vertices, result.faces, gt, samples=30_000)
    # Measured 0.344: the hull's facets between views and the under-side cone no view sees into.
    assert metrics["fscore"] >= 0.28, metrics


def test_one_wrong_mask_does_not_cut_the_object():
    """A view whose mask lost half the object (a bad segmentation of one generated frame) cuts
    nothing the splats cover in it: the silhouette is the mask or the splats' coverage."""
    gt, views, splats = _ideal("sphere")
    masks = views.masks.clone()
    masks[0, :, : SIZE // 2] = 0.0  # the left half of view 0 is "background"
    broken = dataclasses.replace(views, masks=masks)
    whole = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    cut = mesh_from_splats(splats, MeshConfig(**MESH), views=broken)
    a = geometry_metrics(whole.vertices, whole.faces, gt, samples=30_000)
    b = geometry_metrics(cut.vertices, cut.faces, gt, samples=30_000)
    assert b["fscore"] >= a["fscore"] - 0.02 and b["chamfer"] <= a["chamfer"] + 0.002, (a, b)


def test_the_hull_keeps_a_small_separate_piece():
    """A piece under the floater rule's share of marching cubes' faces (here 0.9 % of the area; a
    twig marching cubes cut off its branch, a button beside a box) lies inside every view's
    silhouette: the hull keeps it, where a density surface drops such pieces as floaters."""
    piece_centre = np.array([0.38, 0.0, 0.0])
    gt = trimesh.util.concatenate([
        trimesh.creation.icosphere(subdivisions=3, radius=0.3),
        trimesh.creation.box(extents=(0.04, 0.04, 0.04)).apply_translation(piece_centre),
    ])  # fmt: skip
    assert 6 * 0.04**2 / gt.area < MeshConfig().min_component_fraction
    views = render_views(gt)
    splats = splats_on_surface(gt, 6000, color_fn=stripes_color)
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    assert result.report.components == 2 and result.report.removed_components == 0, result.report
    _, label = face_components(len(result.vertices), result.faces)
    piece = result.vertices[result.faces[label == np.argmin(np.bincount(label))]].reshape(-1, 3)
    assert np.linalg.norm(piece.mean(0) - piece_centre) < 0.01 and np.abs(piece - piece_centre).max() < 0.05  # 2.6 px wide: the hull of 16 views is fatter


def test_more_hull_pieces_than_the_face_budget_holds_keep_the_largest():
    """Thirty cubes (a shelf of parts, a tree's leaves) at a face budget of 100: a closed piece needs
    4 faces, so the mesh keeps the 25 largest instead of failing the job after its fit."""
    cubes = [trimesh.creation.box(extents=(0.07,) * 3).apply_translation((x, y, 0.0)) for x in np.linspace(-0.4, 0.4, 6) for y in np.linspace(-0.32, 0.32, 5)]
    gt = trimesh.util.concatenate(cubes)
    views, splats = render_views(gt), splats_on_surface(gt, 6000, color_fn=stripes_color)
    assert mesh_from_splats(splats, MeshConfig(**MESH), views=views).report.components == 30
    small = mesh_from_splats(splats, MeshConfig(**{**MESH, "face_budget": 100}), views=views)
    assert small.report.components == 25 and small.report.removed_components == 5 and small.report.faces <= 100


def _line_views(thin_in: int, views: int = 4, size: int = 32) -> torch.Tensor:
    """[views, size, size] silhouettes: a line two pixels wide through the centre covering 0.4 of
    its pixels (a twig under half a pixel: outside the 1/2 edge) in the first `thin_in` views, a
    broad disc in the others."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2).astype(np.float32)
    line = np.zeros((size, size), np.float32)
    line[4:-4, size // 2 - 1 : size // 2 + 1] = 0.4
    return torch.from_numpy(np.stack([line if v < thin_in else disc for v in range(views)]))


@pytest.mark.parametrize("thin_in, inside", [(4, True), (1, False)])
def test_a_part_thin_in_most_views_is_kept_and_a_sheet_seen_edge_on_is_not_thickened(thin_in, inside):
    """A part under half a pixel wide is outside every silhouette's 1/2 edge: where it is thin in
    most views (a twig, a tail's tip) its silhouettes are raised there and it stays; where only a
    few views see it thin (a sheet edge-on: the rest see it broad) nothing is raised."""
    from im3d.mesh import hull

    cameras = orbit_cameras(4, elevation_deg=0.0, radius=2.0, fov_deg=40.0, width=32)
    silhouettes = _line_views(thin_in)
    lifted, thin = hull._thin_parts(silhouettes)
    assert thin is not None and float(lifted[0].max()) == pytest.approx(0.4 + hull.THIN_LIFT)
    assert torch.equal(lifted[thin_in:], silhouettes[thin_in:])  # a broad body's rim is not raised
    centre = torch.zeros(1, 3)
    distance = hull._silhouette_distance(centre, cameras.viewmats.float(), cameras.Ks.float(), silhouettes, lifted, thin, 0.1)
    assert (float(distance[0]) > 0) == inside, float(distance[0])


@pytest.mark.parametrize("thin_in, carved", [(4, False), (1, True)])
def test_depth_does_not_carve_a_part_thin_in_most_views(thin_in, carved):
    """A twig's rendered depth lies behind it (the fit's lag is more than its thickness, or the
    pixel's depth is the surface behind a part covering under half of it): depth carving leaves a
    part thin in most views to its silhouettes, and carves a body seen broad as before."""
    from im3d.mesh import hull

    cameras = orbit_cameras(4, elevation_deg=0.0, radius=2.0, fov_deg=40.0, width=32)
    _, thin = hull._thin_parts(_line_views(thin_in))
    carve_to = torch.full((4, 32, 32), 2.1)  # every view's depth: a surface 0.1 behind the centre (camera z 2.0)
    distance = hull._depth_distance(torch.zeros(1, 3), cameras.viewmats.float(), cameras.Ks.float(), carve_to, thin, 0.05)
    assert float(distance[0]) == pytest.approx(-0.05 if carved else 0.05), float(distance[0])


def test_unseen_underside_is_closed_flat_not_hung_as_a_cone():
    """From rings of views above the cup no view sees below its bottom rim: the hull alone hangs a
    cone there; the mesh closes flat at the lowest seen point instead (mesh.flat_underside)."""
    gt, flat, cone = _with_and_without("cup", "flat_underside")
    voxel = 1.2 / MESH["grid_resolution"]  # about: the grid spans the splats (~1.0) plus a margin
    bottom = float(gt.vertices[:, 2].min())
    print(f"lowest vertex: flat {flat.vertices[:, 2].min():.3f}, cone {cone.vertices[:, 2].min():.3f}, true {bottom:.3f}")
    assert abs(float(flat.vertices[:, 2].min()) - bottom) <= 3 * voxel
    assert float(cone.vertices[:, 2].min()) < bottom - 0.05  # the cone is there without the cut: the test can fail
    inside = contains(flat.vertices, flat.faces, np.array([[0.0, 0.0, bottom - 0.04], [0.0, 0.0, -0.32], [0.33, 0.0, -0.3]]))
    assert inside == [False, True, True], inside
    a = geometry_metrics(flat.vertices, flat.faces, gt, samples=30_000)
    b = geometry_metrics(cone.vertices, cone.faces, gt, samples=30_000)
    assert a["fscore"] > b["fscore"] + 0.05 and a["chamfer"] < b["chamfer"], (a, b)


def test_a_box_with_rounded_edges_stands_on_its_base():
    """Its sections narrow toward the bottom like a sphere's (rounded edges), but its base is most
    of its width: the unseen underside is cut flat too, not left as the hull's cone."""
    gt, flat, cone = _with_and_without("rounded_box", "flat_underside")
    bottom = float(gt.vertices[:, 2].min())
    print(f"rounded box's lowest vertex: flat {flat.vertices[:, 2].min():.3f}, cone {cone.vertices[:, 2].min():.3f}, true {bottom:.3f}")
    # Measured: flat -0.177 (the rounded edge is seen only down to there from 20° up, 1.7 away),
    # cone -0.277, true -0.200; Chamfer 0.025 / 0.034, F 0.501 / 0.522 (with the outlines fitted
    # to the views both gained: F 0.232 / 0.201 before, so F no longer tells the two apart).
    assert abs(float(flat.vertices[:, 2].min()) - bottom) <= 0.035 and bottom - float(cone.vertices[:, 2].min()) > 0.06
    a = geometry_metrics(flat.vertices, flat.faces, gt, samples=30_000)
    b = geometry_metrics(cone.vertices, cone.faces, gt, samples=30_000)
    assert a["chamfer"] < 0.85 * b["chamfer"] and a["fscore"] > b["fscore"] - 0.05, (a, b)


def test_a_ring_through_the_middle_closes_the_top_and_the_bottom():
    """From a ring at the box's mid-height (elevation 0) neither its top nor its bottom is seen:
    the hull alone hangs a tent over the one and under the other; both close at the seen edges."""
    gt, flat, tents = _with_and_without("rounded_box", "flat_underside", elevations=(0.0,), per_ring=12)
    top, bottom = float(gt.vertices[:, 2].max()), float(gt.vertices[:, 2].min())
    for name, mesh in (("closed", flat), ("tents", tents)):
        print(f"{name}: top {mesh.vertices[:, 2].max():.3f} bottom {mesh.vertices[:, 2].min():.3f} (true {top:.3f} {bottom:.3f})")
    # Measured: closed 0.200 / -0.199, tents 0.241 / -0.242 (true ±0.200).
    assert abs(float(flat.vertices[:, 2].max()) - top) <= 0.015 and abs(float(flat.vertices[:, 2].min()) - bottom) <= 0.015
    assert float(tents.vertices[:, 2].max()) > top + 0.03 and float(tents.vertices[:, 2].min()) < bottom - 0.03  # the test can fail
    a = geometry_metrics(flat.vertices, flat.faces, gt, samples=30_000)
    b = geometry_metrics(tents.vertices, tents.faces, gt, samples=30_000)
    assert a["fscore"] > b["fscore"] + 0.05 and a["chamfer"] < 0.8 * b["chamfer"], (a, b)


def test_a_top_standing_above_a_low_ring_is_closed_and_a_top_seen_from_above_is_not_touched():
    """From a ring 8° up (cameras 0.24 above the middle) a box 0.9 tall is seen from below at its
    top: the hull tents over it; it closes at its seen edge. From 20° and 50° up its top is seen:
    the end is left alone (not cut below it)."""
    gt, closed, tents = _with_and_without("tall_box", "flat_underside", elevations=(8.0,), per_ring=12)
    top = float(gt.vertices[:, 2].max())
    print(f"top from 8°: closed {closed.vertices[:, 2].max():.3f}, tents {tents.vertices[:, 2].max():.3f}, true {top:.3f}")
    # Measured: closed 0.452, tents 0.483, true 0.450.
    assert abs(float(closed.vertices[:, 2].max()) - top) <= 0.01 and float(tents.vertices[:, 2].max()) > top + 0.025
    gt, views, splats = _ideal("tall_box")  # rings 20° and 50° up
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    assert top - 0.005 <= float(result.vertices[:, 2].max()) <= top + 0.025  # measured 0.467: the hull's own top


def test_a_round_underside_is_not_cut_flat():
    """Under a sphere the lowest seen point (from 20° up and 1.7 away) is 0.3 radii above its
    bottom; cutting there would flatten it, so the cut is made only under a standing base."""
    gt, views, splats = _ideal("sphere")
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    print(f"sphere's lowest vertex {result.vertices[:, 2].min():.3f}")
    assert float(result.vertices[:, 2].min()) < -0.47


def test_a_round_underside_closes_as_its_sides_curve_in():
    """From one ring 15° up the hull hangs a cone under a sphere (its tip 0.1 below the bottom);
    below the lowest seen point the mesh continues the sides' curve instead (a circle with their
    slope there) and closes near the true bottom."""
    gt, rounded, cone = _with_and_without("sphere", "flat_underside", **LOW_RING)
    bottom = float(gt.vertices[:, 2].min())
    print(f"sphere's lowest vertex: rounded {rounded.vertices[:, 2].min():.3f}, cone {cone.vertices[:, 2].min():.3f}, true {bottom:.3f}")
    # Measured: rounded -0.496, cone -0.595, true -0.5.
    assert abs(float(rounded.vertices[:, 2].min()) - bottom) <= 0.035 and bottom - float(cone.vertices[:, 2].min()) > 0.07
    a = geometry_metrics(rounded.vertices, rounded.faces, gt, samples=30_000)
    b = geometry_metrics(cone.vertices, cone.faces, gt, samples=30_000)
    assert a["chamfer"] < b["chamfer"], (a, b)


def test_views_all_round_the_object_cut_nothing_flat():
    """With views below as well as above, the hull sees the underside itself: no flat cut; nor with
    views from one side only."""
    from im3d.mesh.hull import _back_projected, _lowest_seen_level, _orbit_ends

    def down_for(elevations):
        ends, down = _orbit_ends(render_cameras(elevations).viewmats.float(), np.zeros(3))
        if down is not None:  # a ring above: its axis, down first
            assert len(ends) == 2 and ends[0] is down and torch.allclose(ends[1], -down), (ends, down)
        return down

    above = down_for((20.0, 50.0))
    assert above is not None and torch.allclose(above, torch.tensor([0.0, 0.0, -1.0]), atol=1e-4), above
    cams = render_cameras((20.0, 50.0))
    depth = torch.full((len(cams), 4, 4), 1.7)  # every pixel sees something
    assert _lowest_seen_level(depth, _back_projected(depth, cams.viewmats.float(), cams.Ks.float())[1] @ above) is not None
    assert down_for((30.0, -30.0)) is None
    below = down_for((-25.0,))  # a ring below: "down" is up
    assert below is not None and float(below[2]) > 0.99, below

    # Views from one side only (one photo, a half-orbit): "away from the cameras" is the back.
    cams = render_cameras((20.0,))
    for subset in ([0], [0, 1, 2], [0, 1, 2, 3]):
        assert _orbit_ends(cams.viewmats[subset].float(), np.zeros(3)) == ([], None), subset
    assert _orbit_ends(cams.viewmats[[0, 2, 4, 6]].float(), np.zeros(3))[1] is not None  # four views 90° apart surround it


def test_a_ring_through_the_middle_hides_both_ends():
    """A turntable at elevation 0 (SV3D_u's) sees the top and the bottom edge-on: both are unseen
    ends, along the ring's axis, and down is against the cameras' up - also upside down."""
    from im3d.mesh.hull import _orbit_ends

    cams = orbit_cameras(21, elevation_deg=0.0, radius=2.0, fov_deg=40.0, width=8)
    ends, down = _orbit_ends(cams.viewmats.float(), np.zeros(3))
    assert down is not None and torch.allclose(down, torch.tensor([0.0, 0.0, -1.0]), atol=1e-4), down
    assert len(ends) == 2 and torch.allclose(ends[0], down) and torch.allclose(ends[1], -down), ends
    flipped = cams.viewmats.clone()
    flipped[:, :2] *= -1  # every camera rolled 180° about its axis: world +z is now image-down
    ends, down = _orbit_ends(flipped.float(), np.zeros(3))
    assert down is not None and torch.allclose(down, torch.tensor([0.0, 0.0, 1.0]), atol=1e-4), down
    assert _orbit_ends(cams.viewmats[:10].float(), np.zeros(3)) == ([], None)  # half a ring: the far side is the back, no end


def test_down_is_the_orbits_axis_wherever_the_grid_is_centred():
    """Floaters can stretch the grid to one side of the orbit's axis (0.2 off it: a table fitted from
    30° up). "Down" is taken from where the views look, so it stays the ring's axis: from the
    grid's centre the ring leaned 8°, and every cut with it (that table's F 0.665 -> 0.955)."""
    from im3d.mesh.hull import _focus, _orbit_ends

    cams = orbit_cameras(16, elevation_deg=30.0, radius=2.7, fov_deg=40.0, width=8)
    for centre in ([0.0, 0.0, 0.0], [0.0, -0.2, 0.2], [0.3, 0.1, -0.1]):
        ends, down = _orbit_ends(cams.viewmats.float(), np.array(centre))
        assert down is not None and len(ends) == 2 and ends[0] is down and torch.allclose(down, torch.tensor([0.0, 0.0, -1.0]), atol=1e-4), (centre, down)
    assert torch.allclose(_focus(cams.viewmats.float()), torch.zeros(3), atol=1e-4)
    assert _focus(cams.viewmats[:1].float()) is None  # one view's axis: no point where views meet


def render_cameras(elevations, per_ring: int = 8):
    rings = [
        orbit_cameras(per_ring, elevation_deg=e, radius=1.7, fov_deg=40.0, width=4, azimuth_start_deg=22.5 * r)
        for r, e in enumerate(elevations)
    ]
    return type(rings[0])(torch.cat([r.viewmats for r in rings]), torch.cat([r.Ks for r in rings]), 4, 4)


def test_coarse_to_fine_field_matches_the_full_evaluation_where_marching_cubes_reads_it():
    """The hull's fields are evaluated on every other grid point first and refined near the
    surface: signs must equal a full evaluation's, and values must be exact at both ends of every
    grid edge the surface crosses (all marching cubes reads), for shapes down to ~2 voxels thick
    and for the min() of two passes as carve_field combines them (a silhouette-like field that
    saturates at under a voxel, carved by a distance field where it is not settled outside)."""
    from im3d.mesh.hull import _coarse_to_fine, _exact_where_the_sign_changes

    n = 64
    axes = [torch.linspace(-1.0, 1.0, n) for _ in range(3)]
    voxel = 2.0 / (n - 1)
    clamp = 3 * voxel

    def solid(points):  # sphere, torus and a plate 2.5 voxels thick; saturates at ~a voxel varying with x, like a silhouette with depth
        x, y, z = points.unbind(-1)
        sphere = 0.35 - (points - torch.tensor([0.4, 0.3, 0.0])).norm(dim=-1)
        torus = 0.08 - torch.sqrt((torch.sqrt((x + 0.3) ** 2 + y**2) - 0.3) ** 2 + z**2)
        plate = torch.minimum(1.25 * voxel - (z - 0.5).abs(), 0.6 - torch.maximum(x.abs(), y.abs()))
        return torch.maximum(torch.maximum(sphere, torus), plate).clamp(-clamp, 0.8 * voxel) * (1 + 0.5 * x)

    def carve(points):  # a wavy slab carved out of everything
        x, y, z = points.unbind(-1)
        return ((z - 0.1 * torch.sin(7 * x) * torch.cos(5 * y)).abs() - 0.06).clamp(-clamp, clamp)

    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)
    full = torch.minimum(solid(grid), carve(grid)).view(n, n, n)
    hull, hull_exact = _coarse_to_fine(solid, axes, None, None, lambda f: None)
    carved, carved_exact = _coarse_to_fine(carve, axes, hull > -clamp, None, lambda f: None)
    passes = [(hull, hull_exact, solid), (carved, carved_exact, carve)]
    field = _exact_where_the_sign_changes(passes, axes, None)
    assert torch.equal(field > 0, full > 0)
    inside = full > 0
    for axis in range(3):
        differs = inside.narrow(axis, 1, n - 1) != inside.narrow(axis, 0, n - 1)
        for start in (0, 1):
            assert torch.allclose(field.narrow(axis, start, n - 1)[differs], full.narrow(axis, start, n - 1)[differs], atol=1e-7)
    assert float(hull_exact.float().mean()) < 0.5  # and it did skip much of the grid

    # Unwanted points are +inf (nothing under min()).
    wanted = grid[:, 0].view(n, n, n) < 0
    values, _ = _coarse_to_fine(solid, axes, wanted, None, lambda f: None)
    assert bool(torch.isinf(values[~wanted]).all()) and torch.equal(values[wanted] > 0, solid(grid).view(n, n, n)[wanted] > 0)


def test_carving_depths_lose_single_pixel_pits_but_keep_slopes_and_concavities():
    """The carving depths are median-filtered: a lone deep pixel (a gap between Gaussians) would dig
    a pit a lit render shows as a dark speck; a slanted surface and a real concavity must stay."""
    from im3d.mesh.hull import MEDIAN_PIXELS, _median_filter

    H = W = 24
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    slope = 2.0 + 0.05 * u + 0.02 * v  # a slanted plane
    maps = slope.clone()
    maps[5, 5] += 1.0  # a lone deep pixel
    maps[12:22, 12:22] += 0.5  # a concavity 10 pixels across
    known = torch.ones(1, H, W, dtype=torch.bool)
    known[0, :, :2] = False  # no depth at the left edge (outside the object)
    out = _median_filter(maps[None], known, MEDIAN_PIXELS)[0]
    step = 0.07  # the slope's change from a pixel to its diagonal neighbour: the median may move a rank
    assert abs(float(out[5, 5] - slope[5, 5])) < step  # the pit (1.0 deep) is gone
    flat = torch.ones(H, W, dtype=torch.bool)
    flat[3:8, 3:8] = False
    flat[10:24, 10:24] = False
    assert torch.allclose(out[flat & known[0]], slope[flat & known[0]], atol=step)  # the slope, even next to unknown pixels
    assert torch.allclose(out[14:20, 14:20], maps[14:20, 14:20], atol=1e-5)  # the concavity's inside
    assert torch.equal(out[:, :2], maps[:, :2])  # unknown pixels untouched


LOW_RING = dict(elevations=(15.0,), per_ring=16)  # a generated orbit's: 16 views 15° up


def test_a_bowls_hidden_inside_is_opened():
    """From one ring 15° up, no view sees a bowl's inside below the rays that graze its rim: the
    hull keeps it filled (a dome). It is opened (mesh.open_hollows), its walls kept. (Its inner
    floor follows the hull's closure under the round bottom, which no view sees: 6 cm low here.
    A tall cup seen from its rim's height, 3° up, shows no inside at all: it stays closed.)"""
    gt, opened, filled = _with_and_without("bowl", "open_hollows", **LOW_RING)
    # The walls' points lie mid-wall (at z 0 the wall spans r 0.435-0.477).
    hidden, walls = [(0.0, 0.0, -0.2), (0.15, 0.1, -0.15)], [(0.456, 0.0, 0.0), (-0.34, 0.0, -0.19), (0.0, 0.4, -0.12)]
    assert contains(opened.vertices, opened.faces, np.array(hidden + walls)) == [False] * 2 + [True] * 3
    assert contains(filled.vertices, filled.faces, np.array(hidden)) == [True] * 2  # without it: filled, so the test can fail
    a = geometry_metrics(opened.vertices, opened.faces, gt, samples=30_000)
    b = geometry_metrics(filled.vertices, filled.faces, gt, samples=30_000)
    print(f"bowl: opened F {a['fscore']:.3f} chamfer {a['chamfer']:.4f}; filled F {b['fscore']:.3f} chamfer {b['chamfer']:.4f}")
    assert a["fscore"] > b["fscore"] + 0.1 and a["chamfer"] < b["chamfer"], (a, b)


@pytest.mark.parametrize("name", ["sphere", "rounded_box"])
def test_solids_are_not_hollowed(name):
    """Their cores lie deep behind seen surfaces too, but under no hidden floor: nothing opens."""
    _, opened, filled = _with_and_without(name, "open_hollows", **LOW_RING)
    assert np.array_equal(opened.vertices, filled.vertices) and np.array_equal(opened.faces, filled.faces)


def test_a_torus_hole_opens_but_its_tubes_stay_solid():
    """From 15° up a torus' hole is hidden too (the hull fills it, a dome between the tubes): it
    opens, but only straight under that floor. The tubes' cores lie as far from any seen wall and
    connect to the hole's fill; they stay solid."""
    _, opened, filled = _with_and_without("torus", "open_hollows", **LOW_RING)
    hole, tubes = [(0.0, 0.0, 0.0), (0.1, 0.1, 0.0)], [(0.35, 0.0, 0.0), (-0.35, 0.0, 0.0), (0.0, 0.35, 0.0), (0.25, -0.25, 0.0)]
    assert contains(opened.vertices, opened.faces, np.array(hole + tubes)) == [False] * 2 + [True] * 4
    assert contains(filled.vertices, filled.faces, np.array(hole)) == [True] * 2  # the filled hole: the test can fail


def test_a_table_tops_hidden_underside_is_closed_at_its_seen_edge():
    """From one ring 15° up no view sees under a table's top: rays under its near edge descend
    away from it, so the hull hangs a tent there (0.27 of the top's half-width deep at its
    middle). The underside is closed at the height where the views see the top's side end
    (mesh.close_overhangs); the legs stay whole."""
    gt, closed, tent = _with_and_without("table", "close_overhangs", **LOW_RING)
    under = [(0.0, 0.0, 0.05), (0.2, 0.05, 0.05), (-0.25, -0.1, 0.06)]  # in the tent, 4-5 cm under the top
    solid = [(0.0, 0.0, 0.13), (0.3, -0.2, 0.12), (0.38, 0.23, -0.1), (-0.38, -0.23, -0.2), (0.38, -0.23, 0.05)]  # top, legs
    assert contains(closed.vertices, closed.faces, np.array(under + solid)) == [False] * 3 + [True] * 5
    assert contains(tent.vertices, tent.faces, np.array(under)) == [True] * 3  # the tent without it: the test can fail

    def lowest_under_the_middle(mesh) -> float:  # away from the legs; surface samples (a flat cut decimates to a few wide faces)
        points, _ = trimesh.sample.sample_surface(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False), 50_000, seed=0)
        middle = (np.abs(points[:, 0]) < 0.25) & (np.abs(points[:, 1]) < 0.12)
        return float(points[middle, 2].min())

    # Measured: closed 0.084 (the hull a pixel low at the edge: views of 80²), tent 0.02, true 0.1.
    print(f"underside under the middle: closed {lowest_under_the_middle(closed):.3f}, tent {lowest_under_the_middle(tent):.3f}, true 0.1")
    assert abs(lowest_under_the_middle(closed) - 0.1) <= 0.025 and lowest_under_the_middle(tent) < 0.05
    a = geometry_metrics(closed.vertices, closed.faces, gt, samples=30_000)
    b = geometry_metrics(tent.vertices, tent.faces, gt, samples=30_000)
    print(f"table: closed F {a['fscore']:.3f} chamfer {a['chamfer']:.4f}; tent F {b['fscore']:.3f} chamfer {b['chamfer']:.4f}")
    # (F@0.02 of a 0.6-radius object is 1 voxel of this grid: it counts neither underside)
    assert a["chamfer"] < 0.8 * b["chamfer"] and a["fscore"] >= b["fscore"] - 0.01, (a, b)


def test_a_hidden_underside_just_above_the_lowest_seen_point_is_not_cut():
    """An overhang stands clear of its base. Hidden surface just above the lowest seen point is a
    body's underside over its base (a sitting rabbit's round belly, seen down to its haunches:
    the hull's tent hugs it there, and cut flat it lost 1.4 dB): the table's field is cut with its
    floor where the views see it, and left as it is with the lowest seen point just under its top."""
    from im3d.mesh import splats_to_gaussians
    from im3d.mesh.hull import CLAMP_VOXELS, carve_field
    from im3d.mesh.overhangs import close_hidden_undersides

    _, views, splats = _ideal("table", **LOW_RING)
    values, grid, used = carve_field(splats, splats_to_gaussians(splats), 96, views.cameras, views.masks, 0.05, close_overhangs=False)
    field = torch.from_numpy(values)
    axes = [torch.arange(n, dtype=torch.float32) * grid.voxel + float(grid.origin[a]) for a, n in enumerate(field.shape)]
    down = torch.tensor([0.0, 0.0, -1.0])
    cams = used.cameras

    def closed(level: float) -> torch.Tensor:
        return close_hidden_undersides(
            field, axes, grid.voxel, cams.viewmats.float(), cams.Ks.float(), cams.width, cams.height, down, level, CLAMP_VOXELS * grid.voxel
        )  # fmt: skip

    assert int(((closed(0.35) > 0) != (field > 0)).sum()) > 1000  # the floor (z -0.35) seen: the tent is cut
    assert torch.equal(closed(-0.02), field)  # "seen" down to 12 cm under the top only: untouched


@pytest.mark.parametrize("name", ["hoop", "torus", "cup"])
def test_a_hidden_underside_under_a_thin_bar_or_a_round_one_is_not_cut(name):
    """A standing hoop's hole is topped by surface no view sees, under a bar that ends before any
    seen edge's height; a torus lying flat and a cup hide round undersides seen down to a graze.
    Closing them would cut the bar or flatten the curve: they stay as the hull makes them."""
    gt, closed, kept = _with_and_without(name, "close_overhangs", **LOW_RING)
    a = geometry_metrics(closed.vertices, closed.faces, gt, samples=30_000)
    b = geometry_metrics(kept.vertices, kept.faces, gt, samples=30_000)
    print(f"{name}: with F {a['fscore']:.3f} chamfer {a['chamfer']:.4f}; without F {b['fscore']:.3f} chamfer {b['chamfer']:.4f}")
    assert a["fscore"] >= b["fscore"] - 0.01 and a["chamfer"] <= b["chamfer"] + 0.001, (a, b)
    if name == "hoop":  # the bar over the hole is whole, the hole open
        assert contains(closed.vertices, closed.faces, np.array([(0.0, 0.0, 0.3), (0.0, 0.0, 0.0), (0.0, 0.0, 0.19)])) == [True, False, False]


def test_a_bowl_open_to_near_its_bottom_does_not_stand_on_a_base():
    """Seen from 30° up a bowl is carved open down to near its bottom, where the carved section (a
    disc) is wider than the thin rings above it: sections count the holes they enclose, so its
    round underside keeps the hull's closure; a solid cylinder does stand on its base."""
    from im3d.mesh.hull import _Sections, _stands_on_a_base

    n = 64
    axis = torch.linspace(-0.5, 0.5, n)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = (x**2 + y**2 + (z - 0.2) ** 2).sqrt()  # a hemispherical shell, centre z 0.2, radius 0.5
    shell = (radius <= 0.5) & (radius >= 0.44) & (z <= 0.2)
    lens = (radius <= 0.5) & (z <= -0.17)  # its bottom, left filled (unseen) under the opened inside
    bowl_field = torch.where(shell | lens, 1.0, -1.0)
    cylinder = torch.where((x**2 + y**2 <= 0.3**2) & (z.abs() <= 0.3), 1.0, -1.0)
    down, voxel = torch.tensor([0.0, 0.0, -1.0]), float(axis[1] - axis[0])
    assert not _stands_on_a_base(_Sections.of(bowl_field, -z, down, voxel), 0.2, 2.2)  # cut at z -0.2
    assert _stands_on_a_base(_Sections.of(cylinder, -z, down, voxel), 0.28, 2.2)  # cut at z -0.28


def test_standing_is_judged_against_how_the_views_graze_the_lowest_seen_point():
    """Sides that narrow toward the lowest seen point at radius per height 0.5 are a wall above a
    base to a ring of views 15° up (they graze a wall there at ~2.6: a bunny's rounded feet read
    as round under the old absolute slope 0.4), and a limb to views from 60° up (grazing ~0.6)."""
    from im3d.mesh.hull import _grazing_slope, _Sections, _stands_on_a_base

    down = torch.tensor([0.0, 0.0, -1.0])
    low_ring = orbit_cameras(8, elevation_deg=15.0, radius=2.7, fov_deg=40.0, width=8).viewmats.float()
    high_ring = orbit_cameras(8, elevation_deg=60.0, radius=2.7, fov_deg=40.0, width=8).viewmats.float()
    # From the point 0.3 below the centre: cot of the elevation the views are seen at from there.
    eye_low = (2.7 * math.cos(math.radians(15.0)), 2.7 * math.sin(math.radians(15.0)) + 0.3)
    assert _grazing_slope(low_ring, np.zeros(3), down, 0.3) == pytest.approx(eye_low[0] / eye_low[1], rel=1e-3)
    low, high = _grazing_slope(low_ring, np.zeros(3), down, 0.3), _grazing_slope(high_ring, np.zeros(3), down, 0.3)
    assert 2.4 < low < 2.8 and 0.5 < high < 0.7, (low, high)
    assert _grazing_slope(low_ring, np.zeros(3), down, -1.0) == math.inf  # views level with it or below see under it

    n = 64
    axis = torch.linspace(-0.5, 0.5, n)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    # A funnel standing on its narrow end: radius 0.15 at z -0.3, widening by 0.5 per height up to 0.35.
    funnel = torch.where((x**2 + y**2).sqrt() <= (0.15 + 0.5 * (z + 0.3)).clamp(max=0.35), 1.0, -1.0)
    funnel = torch.where(z.abs() <= 0.3, funnel, torch.full_like(funnel, -1.0))
    sections = _Sections.of(funnel, -z, down, float(axis[1] - axis[0]))
    assert _stands_on_a_base(sections, 0.28, low)
    assert not _stands_on_a_base(sections, 0.28, high)

def _tapered_block() -> trimesh.Trimesh:
    """A block 0.8 x 0.6 at its top, narrowing by 0.26 per height to 0.54 x 0.34 at its base, 0.5 below."""
    top = [(x, y, 0.25) for x in (-0.4, 0.4) for y in (-0.3, 0.3)]
    bottom = [(x, y, -0.25) for x in (-0.27, 0.27) for y in (-0.17, 0.17)]
    return trimesh.convex.convex_hull(np.array(top + bottom))


def test_walls_facing_the_views_just_above_the_lowest_seen_point_stand_on_a_base():
    """From a ring of views 15° up, the surface just above the lowest seen point faces the views
    where walls end at a base's edge (a box, seen square and corner-on; a block narrowing toward
    its base, as a round underside's sections do; a standing cylinder), and is seen grazing on a
    round underside's limb (a sphere, a lying capsule, a torus)."""
    from im3d.mesh.hull import WALL_FACING, _back_projected, _facing_at_the_lowest_seen, _lowest_seen_level
    from im3d.mesh.zbuffer import rasterize_triangles

    size = 96
    cams = orbit_cameras(8, elevation_deg=15.0, radius=1.7, fov_deg=40.0, width=size)  # views 1, 3, 5, 7 see the box corner-on
    down = torch.tensor([0.0, 0.0, -1.0])
    capsule = trimesh.creation.capsule(height=0.5, radius=0.2)
    capsule.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    standing = {
        "box": trimesh.creation.box(extents=(0.8, 0.6, 0.5)),
        "tapered block": _tapered_block(),
        "cylinder": trimesh.creation.cylinder(radius=0.35, height=0.5, sections=64),
    }
    round_ = {
        "sphere": trimesh.creation.icosphere(subdivisions=4, radius=0.4),
        "capsule": capsule,
        "torus": trimesh.creation.torus(major_radius=0.3, minor_radius=0.12),
    }
    facing = {}
    for name, mesh in {**standing, **round_}.items():
        depth = np.stack([
            rasterize_triangles(mesh.vertices, mesh.faces, cams.viewmats[i].numpy(), cams.Ks[i].numpy(), size, size).depth
            for i in range(len(cams))
        ])  # fmt: skip
        depth = torch.from_numpy(np.where(np.isfinite(depth), depth, np.inf)).float()
        points, world = _back_projected(depth, cams.viewmats.float(), cams.Ks.float())
        heights = world @ down
        level = _lowest_seen_level(depth, heights)
        if name in standing:  # seen down to its base's edge (a round underside: to a limb above its bottom)
            assert level == pytest.approx(float(-mesh.bounds[0, 2]), abs=0.02), name
        facing[name] = _facing_at_the_lowest_seen(depth, points, heights, level, 0.03)
    assert all(facing[name] >= WALL_FACING + 0.1 for name in standing), facing
    assert all(facing[name] <= WALL_FACING - 0.05 for name in round_), facing


@pytest.mark.parametrize("shape", ["sphere", "capsule", "torus"])
def test_rounded_underside_continues_the_sides_curve(shape):
    """Field-level check of the closure under a round underside: a shape's own field above the
    lowest seen level, the hull's cone below it (no view sees there). The closure reaches the true
    bottom, a lying capsule keeps its length (the section is eroded, not scaled), a torus its hole."""
    from im3d.mesh.hull import _rounded_underside, _Sections

    n = 96
    axis = torch.linspace(-0.6, 0.6, n)
    voxel = float(axis[1] - axis[0])
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    if shape == "sphere":
        true = 0.4 - (x**2 + y**2 + z**2).sqrt()
    elif shape == "capsule":  # along x, radius 0.3, straight part 0.5 long
        true = 0.3 - (torch.clamp(x.abs() - 0.25, min=0) ** 2 + y**2 + z**2).sqrt()
    else:  # lying flat, major radius 0.35, tube radius 0.2
        true = 0.2 - (((x**2 + y**2).sqrt() - 0.35) ** 2 + z**2).sqrt()
    bottom, top = float(z[true > 0].min()), float(z[true > 0].max())
    level = bottom + 0.15 * (top - bottom)  # seen down to 0.15 of its height above its bottom
    # Below the level, the hull's cone: each column as deep as the shape is thick there, coming in
    # at 0.6 per height (grazing rays), so it hangs below the true bottom.
    columns = true.amax(dim=2, keepdim=True).expand_as(true)
    cone = torch.where(z < level, columns - 0.6 * (level - z), true)
    down = torch.tensor([0.0, 0.0, -1.0])
    height = -z
    cap = _rounded_underside(_Sections.of(cone, height, down, voxel), -level, height, 1)
    assert cap is not None
    closed = torch.minimum(cone, cap)
    lowest = float(z[closed > 0].min())
    print(f"{shape}: lowest {lowest:.3f}, true {bottom:.3f}, cone {float(z[cone > 0].min()):.3f}")
    assert abs(lowest - bottom) <= 2 * voxel
    assert float(z[cone > 0].min()) < bottom - 4 * voxel  # the cone alone hangs lower: the test can fail
    # Half-way between the level and the bottom, the closed section matches the true one.
    k = int(torch.argmin((axis - 0.5 * (level + bottom)).abs()))
    section, truth = closed[:, :, k] > 0, true[:, :, k] > 0
    iou = float((section & truth).sum() / (section | truth).sum())
    print(f"  section IoU half-way down {iou:.3f}")
    assert iou >= 0.7


def box_with_a_pocket(depth: float = 0.06) -> trimesh.Trimesh:
    """A box (0.8 x 0.6 x 0.6) with a shallow rectangular pocket (0.4 wide, 0.3 tall, `depth`
    deep) in its +y face: a hollow no silhouette shows, only the depth (marching cubes of the
    signed distance, so edges are slightly rounded)."""
    import mcubes

    n = 96
    axis = np.linspace(-0.5, 0.5, n)
    p = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)

    def box(centre, half):
        q = np.abs(p - np.asarray(centre)) - np.asarray(half)
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)

    sdf = np.maximum(box((0, 0, 0), (0.4, 0.3, 0.3)), -box((0, 0.3, 0), (0.2, depth, 0.15)))
    vertices, faces = mcubes.marching_cubes(-sdf, 0.0)
    return trimesh.Trimesh(vertices / (n - 1) - 0.5, faces[:, ::-1], process=True)


def test_carving_margin_grows_with_the_slant():
    """The fit's depth lies further behind the surface where it is slanted to the view, so the
    carving margin is the configured one on a surface facing the view and grows as 1/cos of its
    slant, up to three times (70°); outlines (pixels missing a neighbour) take the largest."""
    from im3d.mesh.hull import SLANT_MARGIN_FACTOR, _slant_margin

    H = W = 32
    f = 100.0
    Ks = torch.tensor([[[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]]]).repeat(4, 1, 1)
    u = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W) + 0.5 - W / 2
    maps = []
    for degrees in (0.0, 45.0, 60.0, 80.0):  # planes through (0, 0, 2) tilted about the camera's y axis
        slope = math.tan(math.radians(degrees))
        maps.append(2.0 / (1.0 - slope * u / f))  # z of the plane z = 2 + slope * x along each pixel's ray
    depth = torch.stack(maps)
    depth[:, :, :3] = float("inf")  # no surface at the left edge
    margin = _slant_margin(depth, Ks, 0.01)
    centre = margin[:, H // 2, W // 2]
    assert torch.allclose(centre[:3], torch.tensor([0.01, 0.01 * math.sqrt(2), 0.02]), rtol=0.03), centre
    assert float(centre[3]) == pytest.approx(SLANT_MARGIN_FACTOR * 0.01)  # 80°: capped
    assert torch.all(margin[:, :, 3] == SLANT_MARGIN_FACTOR * 0.01)  # next to pixels without depth
    assert torch.all(margin[:, :, :3] == SLANT_MARGIN_FACTOR * 0.01)


def test_a_shallow_hollow_no_silhouette_shows_is_carved():
    """A pocket 6 cm deep in a box's side (a cow's belly, a bunny's flank: hollows shallower than
    the hull's 'concavity' rule) shows in no silhouette, only in the splats' depth. The margin
    against the fit's depth error must not keep it filled: measured on 16 public models, a fixed
    margin of 0.15 of the half-size kept every such hollow (docs/benchmarks.md)."""
    gt = box_with_a_pocket()
    views = render_views(gt, **LOW_RING)
    splats = splats_on_surface(gt, 6000, color_fn=stripes_color)
    result = mesh_from_splats(splats, MeshConfig(**MESH), views=views)
    in_the_pocket = [(0.0, 0.28, 0.0), (0.1, 0.27, 0.05)]  # 2-3 cm into its 6 cm: open space
    material = [(0.0, 0.2, 0.0), (0.3, 0.28, 0.0), (0.0, 0.28, 0.22)]  # behind its floor, beside it, above it
    assert contains(result.vertices, result.faces, np.array(in_the_pocket + material)) == [False] * 2 + [True] * 3
    # With the margin of before (0.15 of the half-size, on every surface) carving keeps the pocket
    # filled; the depth fit (mesh/depth_fit.py: the surface pulled in to where all the views'
    # depth puts it) opens it again, the material around it kept.
    before = mesh_from_splats(splats, MeshConfig(**{**MESH, "depth_margin": 0.15, "fit_depth": False}), views=views)
    assert contains(before.vertices, before.faces, np.array(in_the_pocket)) == [True] * 2
    fitted = mesh_from_splats(splats, MeshConfig(**{**MESH, "depth_margin": 0.15}), views=views)
    assert contains(fitted.vertices, fitted.faces, np.array(in_the_pocket + material)) == [False] * 2 + [True] * 3
    assert 0.01 < fitted.report.depth_lag < 0.04  # measured 0.025: splats on the surface, their depth lags by about their size
    assert before.report.depth_lag == 0.0  # not measured when the step is off


def test_carving_margin_is_capped_by_a_thin_parts_half_width_only():
    """The carving margin may not exceed 0.4 of a part's half-width, measured on the silhouette:
    on a leg 6 pixels wide the half-width is its radius, 3 pixels (the margin shrinks to fit it),
    while at a body's rim it is at least the reach (the margin a body's rim needs is kept)."""
    from im3d.mesh.hull import _half_width

    mask = torch.zeros(1, 120, 160)
    mask[0, 20:26, 10:70] = 1.0  # a leg: rows 20-25, 6 pixels thick
    yy, xx = torch.meshgrid(torch.arange(120.0) + 0.5, torch.arange(160.0) + 0.5, indexing="ij")
    mask[0][(yy - 70) ** 2 + (xx - 110) ** 2 <= 40**2] = 1.0  # a body: a disc of radius 40
    depth = torch.where(mask > 0.5, torch.full_like(mask, 2.0), torch.full_like(mask, float("inf")))
    Ks = torch.tensor([[[100.0, 0.0, 80.0], [0.0, 100.0, 60.0], [0.0, 0.0, 1.0]]])
    pixel = 2.0 / 100.0  # world size of a pixel at depth 2
    reach = 10 * pixel
    half = _half_width(mask, depth, Ks, reach)
    assert abs(float(half[0, 22, 40]) - 3 * pixel) < 0.51 * pixel  # the leg's middle
    assert abs(float(half[0, 20, 40]) - 3 * pixel) < 0.51 * pixel  # ... and its edge row
    assert float(half[0, 70, 71]) >= reach  # a body's rim pixel: its inside is within reach
    assert float(half[0, 70, 110]) >= 39 * pixel  # the body's middle
    # The frame's edge is no outline (a leg cut by it goes on), and a view the object fills caps nothing.
    cut = torch.zeros(1, 120, 160)
    cut[0, :, 0:6] = 1.0  # a leg 6 pixels wide along the left edge
    assert abs(float(_half_width(cut, depth.clamp(max=2.0), Ks, reach)[0, 60, 0]) - 6 * pixel) < 0.51 * pixel
    assert bool(torch.isinf(_half_width(torch.ones(1, 120, 160), torch.full((1, 120, 160), 2.0), Ks, reach)).all())


def test_the_bench_writes_views_as_a_generated_job_has_them(tmp_path):
    """`bench_mesh_fidelity.py --segment` fits views on white whose alpha is the product's
    segmentation: written and read back, they are what `orbit_frame_mask` makes of the composite,
    not the source's alpha, with the same cameras."""
    import io
    import zipfile

    from bench_mesh_fidelity import bench_config, write_generated_dataset
    from im3d.cameras import read_transforms
    from im3d.diffusion.foreground import orbit_frame_mask
    from im3d.testing.synthetic import ball_views_zip

    from PIL import Image

    zipfile.ZipFile(io.BytesIO(ball_views_zip(num_views=3, size=32))).extractall(tmp_path / "source")
    for path in (tmp_path / "source" / "images").glob("*.png"):  # a white part of the object: no segmentation sees it
        rgba = np.array(Image.open(path))
        rgba[:4, :4] = 255
        Image.fromarray(rgba, "RGBA").save(path)
    source = read_transforms(tmp_path / "source", "train")
    config = bench_config([])
    written = read_transforms(write_generated_dataset(tmp_path / "source", tmp_path / "views", config), "train")
    composite = source.composited([1.0, 1.0, 1.0])
    assert torch.allclose(written.cameras.viewmats, source.cameras.viewmats, atol=1e-5)
    assert torch.allclose(written.images * written.masks + (1 - written.masks), composite * written.masks + (1 - written.masks), atol=1 / 255)
    expected = torch.stack([orbit_frame_mask(image, config.diffusion.background_threshold) for image in composite])
    assert torch.allclose(written.masks, expected, atol=0.5 / 255)
    assert bool((source.masks[:, :4, :4] == 1).all()) and bool((written.masks[:, :4, :4] == 0).all())
