"""Texture from the views: back-projection onto the UV atlas (mesh/bake_views.py via mesh/texture.py).

Views are rendered (unlit, anti-aliased) from fine ground-truth meshes with known albedo; the
meshes baked are coarser versions of them (facets up to ~1 % of the radius off the true surface,
as meshes from fitted splats are) or, once, the mesh extracted from splats by mesh_from_splats.
The splats are given a wrong colour on purpose, so any texel that silently falls back to them
shows up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import trimesh

from im3d.cameras import Cameras, orbit_cameras
from im3d.config import MeshConfig
from im3d.errors import Cancelled
from im3d.mesh import bake_views, mesh_from_splats, splats_to_gaussians
from im3d.mesh.bake_views import ViewImages
from im3d.mesh.cleanup import vertex_normals
from im3d.testing.synthetic import splats_on_surface
from im3d.mesh.texture import bake_albedo, texel_surface_points, unwrap
from im3d.mesh.zbuffer import render_unlit, uv_texture_shader

FLAT = np.array([0.8, 0.5, 0.2])  # sRGB albedo of the flat object
WRONG = np.array([0.2, 0.9, 0.2])  # what the splats say: must not show where views see the surface


def ring_cameras(views: int = 8, size: int = 96, radius: float = 2.2) -> Cameras:
    """Views from above and below (elevation +-35 deg), azimuths interleaved: every side is seen."""
    up = orbit_cameras(views, elevation_deg=35, radius=radius, fov_deg=40, width=size)
    down = orbit_cameras(views, elevation_deg=-35, radius=radius, fov_deg=40, width=size, azimuth_start_deg=180.0 / views)
    return Cameras(torch.cat([up.viewmats, down.viewmats]), torch.cat([up.Ks, down.Ks]), size, size)


def render_views(mesh: trimesh.Trimesh, color_fn, cameras: Cameras) -> ViewImages:
    """Unlit straight-alpha renders of `mesh` coloured by color_fn(points [P,3]) -> rgb [P,3]."""
    viewmats, Ks = cameras.viewmats.double().numpy(), cameras.Ks.double().numpy()
    images, masks = [], []
    for c in range(len(cameras)):
        rgb, alpha = render_unlit(
            mesh.vertices, mesh.faces, lambda face, bary, points: color_fn(points), viewmats[c], Ks[c],
            cameras.width, cameras.height, supersample=2,
        )  # fmt: skip
        images.append(rgb)
        masks.append(alpha)
    return ViewImages(cameras, torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(np.stack(masks), dtype=torch.float32))


def flat(points: np.ndarray) -> np.ndarray:
    return np.broadcast_to(FLAT, points.shape).copy()


def wrong(points: np.ndarray) -> np.ndarray:
    return np.broadcast_to(WRONG, points.shape).copy()


def red_plus_x_blue_minus_x(points: np.ndarray) -> np.ndarray:
    return np.where((points[:, 0] > 0)[:, None], [0.9, 0.1, 0.1], [0.1, 0.1, 0.9])


def covered_texels(result, size: int):
    from im3d.mesh.texture import UVMesh

    uv_mesh = UVMesh(result.vertices, result.faces, result.uvs, np.arange(len(result.vertices)), 0)
    points, _, rows, cols, _ = texel_surface_points(uv_mesh, size)
    return points, result.texture[rows, cols] / 255.0


@dataclass
class Baked:
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray
    stats: dict


def bake(mesh: trimesh.Trimesh, views: ViewImages, size: int = 256) -> Baked:
    """UV-unwrap `mesh` and bake it from the views (wrong-coloured splats as the fallback)."""
    uv_mesh = unwrap(mesh.vertices, mesh.faces.astype(np.int64), size, 2)
    normals = vertex_normals(mesh.vertices, mesh.faces.astype(np.int64))[uv_mesh.source_vertex]
    gaussians = splats_to_gaussians(splats_on_surface(mesh, 3000, wrong))
    texture, stats = bake_albedo(uv_mesh, gaussians, size, 0.01, views=views, normals=normals)
    return Baked(uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs, texture, stats)


@pytest.fixture(scope="module")
def torus():
    return trimesh.creation.torus(major_radius=0.4, minor_radius=0.15, major_sections=96, minor_sections=48)


@pytest.fixture(scope="module")
def flat_torus_result(torus):
    """A torus (self-occluding: the inner ring hides behind the outer one), baked on a coarse copy."""
    views = render_views(torus, flat, ring_cameras())
    coarse = trimesh.creation.torus(major_radius=0.4, minor_radius=0.15, major_sections=40, minor_sections=16)
    return bake(coarse, views), views


def test_flat_object_gives_a_flat_texture_without_dark_seams(flat_torus_result):
    result, _ = flat_torus_result
    assert result.stats["texture_source"] == "views"
    assert result.stats["view_texels"] > 0.97  # views see (nearly) all of it, splats fill the rest
    _, colours = covered_texels(result, 256)
    # The splats' speckle-prone colour (WRONG) is far from FLAT: a texel taking it would show here.
    assert np.abs(colours - FLAT).max(axis=1).mean() < 0.01
    assert colours.std(axis=0).max() < 0.02, colours.std(axis=0)
    # The whole texture, padding and seams included, is the flat colour: no dark (or wrong) texels.
    # No double gamma either: 0.5 stays 128 (an sRGB->linear slip gives 55, linear->sRGB 188).
    texture = result.texture.reshape(-1, 3) / 255.0
    assert np.quantile(np.abs(texture - FLAT).max(axis=1), 0.999) < 0.05
    assert (texture.min(axis=0) > FLAT - 0.1).all(), texture.min(axis=0)
    assert abs(int(np.median(result.texture[..., 1])) - 128) <= 1


def test_unlit_render_matches_a_held_out_view(torus, flat_torus_result):
    """A view the bake never saw: the textured mesh rendered unlit matches the true render."""
    result, _ = flat_torus_result
    held_out = orbit_cameras(1, elevation_deg=60, radius=2.2, fov_deg=40, width=96, azimuth_start_deg=17.0)
    truth = render_views(torus, flat, held_out)
    rgb, alpha = render_unlit(
        result.vertices, result.faces, uv_texture_shader(result.faces, result.uvs, result.texture),
        held_out.viewmats[0].double().numpy(), held_out.Ks[0].double().numpy(), 96, 96, supersample=2,
    )  # fmt: skip
    inside = (alpha[..., 0] > 0.99) & (truth.masks[0, ..., 0].numpy() > 0.99)
    assert inside.sum() > 1000
    error = rgb[inside] - truth.images[0].numpy()[inside]
    psnr = 10 * np.log10(1.0 / max(float((error**2).mean()), 1e-12))
    assert psnr > 35.0, psnr


def test_two_coloured_sphere_gets_each_colour_on_its_side():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    views = render_views(sphere, red_plus_x_blue_minus_x, ring_cameras())
    result = bake(trimesh.creation.icosphere(subdivisions=2, radius=0.5), views)
    points, colours = covered_texels(result, 256)
    away = np.abs(points[:, 0]) > 0.05  # a few texels off the colour boundary
    truth = red_plus_x_blue_minus_x(points)
    assert np.abs(colours[away] - truth[away]).max(axis=1).mean() < 0.01
    assert np.quantile(np.abs(colours[away] - truth[away]).max(axis=1), 0.99) < 0.1


def test_mesh_from_splats_bakes_from_the_views_it_is_given():
    """The meshing stage passes its views (and normals) to the bake; mesh.texture_from_views=false
    or no views gives the splats' colour, as `im3d mesh` (a PLY, no views) does."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    views = render_views(sphere, red_plus_x_blue_minus_x, ring_cameras(views=4, size=64))
    splats = splats_on_surface(sphere, 3000, wrong)
    config = MeshConfig(grid_resolution=40, face_budget=3000, texture_size=128, texture_padding=2)
    result = mesh_from_splats(splats, config, views=views)
    assert result.report.texture_source == "views" and result.report.view_texels > 0.9
    points, colours = covered_texels(result, 128)
    away = np.abs(points[:, 0]) > 0.08
    assert np.median(np.abs(colours[away] - red_plus_x_blue_minus_x(points[away])).max(axis=1)) < 0.02
    off = mesh_from_splats(splats, MeshConfig(**{**config.__dict__, "texture_from_views": False}), views=views)
    assert off.report.texture_source == "splats"
    _, off_colours = covered_texels(off, 128)
    assert np.median(np.abs(off_colours - WRONG).max(axis=1)) < 0.05


def _two_boxes():
    """A big box (green) and, in front of its -Y face, a small red box (not touching it)."""
    big = trimesh.creation.box(extents=(1.0, 0.6, 1.0))
    small = trimesh.creation.box(extents=(0.25, 0.2, 0.25))
    small.apply_translation((0.0, -0.75, 0.0))
    scene = trimesh.util.concatenate([big, small])

    def colour(points):
        return np.where((points[:, 1] < -0.5)[:, None], [0.9, 0.1, 0.1], [0.1, 0.8, 0.1])

    return scene, colour


def test_a_texel_hidden_in_a_view_does_not_take_that_views_colour():
    scene, colour = _two_boxes()
    # The front view (camera on -Y, head-on to the big box's -Y face: the best view there) sees
    # the small red box where the big face's centre is; two oblique views see that face uncovered.
    cameras = orbit_cameras(1, 0.0, 2.5, 40, 128, azimuths_deg=[0.0, -50.0, 50.0, 180.0, 90.0, -90.0])
    cameras = Cameras(torch.cat([cameras.viewmats, orbit_cameras(2, 89.0, 2.5, 40, 128, azimuths_deg=[0.0, 180.0]).viewmats]),
                      torch.cat([cameras.Ks, cameras.Ks[:2]]), 128, 128)  # fmt: skip
    views = render_views(scene, colour, cameras)
    # The control: the front view itself shows red where the big face's centre projects.
    front = views.images[0].numpy()
    assert front[64, 64, 0] > 0.8 and front[64, 64, 1] < 0.2
    result = bake(scene, views)
    assert result.stats["texture_source"] == "views"
    points, colours = covered_texels(result, 256)
    # Texels on the big box's -Y face right behind the small box (|x|, |z| < 0.1).
    behind = (np.abs(points[:, 1] + 0.3) < 1e-6) & (np.abs(points[:, 0]) < 0.1) & (np.abs(points[:, 2]) < 0.1)
    assert behind.sum() > 50
    assert np.abs(colours[behind] - [0.1, 0.8, 0.1]).max(axis=1).max() < 0.08
    # And the small box's own front face is red. Its top and bottom rims (~8 % of its texels) lie on
    # anti-aliased silhouette pixels, mixed with the green behind, in every view that sees them.
    front_face = np.abs(points[:, 1] + 0.85) < 1e-6
    error = np.abs(colours[front_face] - [0.9, 0.1, 0.1]).max(axis=1)
    assert np.median(error) < 0.01 and np.quantile(error, 0.85) < 0.1, (np.median(error), np.quantile(error, 0.85))


def test_cancel_stops_the_bake_inside_the_texel_loop(monkeypatch):
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    cameras = ring_cameras(views=3, size=48)
    views = render_views(sphere, flat, cameras)
    uv_mesh = unwrap(sphere.vertices, sphere.faces.astype(np.int64), 128, 2)
    points, face, _, _, _ = texel_surface_points(uv_mesh, 128)
    normals = points / np.linalg.norm(points, axis=1, keepdims=True)
    monkeypatch.setattr(bake_views, "CHUNK_TEXELS", 256)  # many chunks, so the loop is where it stops
    messages, calls = [], []

    def cancel():
        calls.append(1)
        # True once the texel loop has started (the first "back-projecting" report).
        return any("back-projecting" in m for m in messages)

    with pytest.raises(Cancelled):
        bake_views.bake_from_views(
            points, normals, normals, uv_mesh.vertices, uv_mesh.faces, views, 0.01,
            progress=lambda f, m: messages.append(m), cancel=cancel,
        )  # fmt: skip
    looped = [m for m in messages if "back-projecting" in m]
    assert len(looped) == 1  # stopped at the very next chunk, not after the whole bake
    assert len(points) > 20 * 256  # ... which was far from the end
    # The same call without cancel runs to the end and colours every seen texel.
    rgb, weight, stats = bake_views.bake_from_views(points, normals, normals, uv_mesh.vertices, uv_mesh.faces, views, 0.01)
    assert stats["texels_seen"] > 0.95
    assert np.abs(rgb[weight > 0] - FLAT).max() < 0.02


def test_bad_views_are_rejected_with_a_clear_message():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    cameras = ring_cameras(views=2, size=32)
    views = render_views(sphere, flat, cameras)
    broken = ViewImages(cameras[[0, 1, 2]], views.images, views.masks)  # 3 cameras, 4 images
    uv_mesh = unwrap(sphere.vertices, sphere.faces.astype(np.int64), 64, 2)
    points, _, _, _, _ = texel_surface_points(uv_mesh, 64)
    with pytest.raises(ValueError, match="4 images .* 3 cameras"):
        bake_views.bake_from_views(points, points * 2, points * 2, uv_mesh.vertices, uv_mesh.faces, broken, 0.01)
