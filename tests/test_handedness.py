"""Orbit cameras are not mirrored: +X projects to the right in the front view, as Blender sees it.

A planted bug negated the orbit cameras' x axis (a mirror image: every generated object would be
reconstructed left-right swapped) and nothing caught it — the existing checks looked at camera
positions, the image centre and "up", all of which a mirror keeps. These tests pin the handedness
twice: on the backend alone (no bpy), and against Blender's own projection
(`bpy_extras.object_utils.world_to_camera_view`) of the add-on's turntable cameras
(`im3d_blender.turntable.look_at` / `orbit_position` / `camera_intrinsics`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from im3d.cameras import look_at_c2w_gl, orbit_cameras, orbit_position, project_points, viewmats_to_c2w_gl

SIZE = 64


def pixel(point, cams):
    pix, depth = project_points(torch.tensor([point], dtype=torch.float32), cams.viewmats, cams.Ks)
    return pix[:, 0].numpy(), depth[:, 0].numpy()


def test_front_view_sees_plus_x_on_the_right_and_plus_z_up():
    front = orbit_cameras(1, elevation_deg=0.0, radius=3.0, fov_deg=40.0, width=SIZE)
    (u, v), = pixel([0.3, 0.0, 0.0], front)[0]
    assert u > SIZE / 2 + 3 and abs(v - SIZE / 2) < 1e-4  # +X: right of centre, same row
    (u, v), = pixel([0.0, 0.0, 0.3], front)[0]
    assert v < SIZE / 2 - 3 and abs(u - SIZE / 2) < 1e-4  # +Z: above the centre
    _, (near,) = pixel([0.0, -0.5, 0.0], front)
    _, (far,) = pixel([0.0, 0.5, 0.0], front)
    assert near == pytest.approx(2.5, abs=1e-5) and far == pytest.approx(3.5, abs=1e-5)  # camera on -Y


@pytest.mark.parametrize(
    "azimuth, right_of_centre",
    [(0.0, (1, 0, 0)), (90.0, (0, 1, 0)), (180.0, (-1, 0, 0)), (270.0, (0, -1, 0)), (45.0, (1, 1, 0))],
)
def test_counter_clockwise_orbit_keeps_the_right_hand_side(azimuth, right_of_centre):
    """Seen from +Z the camera moves counter-clockwise; what is on its right turns with it."""
    cams = orbit_cameras(1, elevation_deg=20.0, radius=2.5, fov_deg=40.0, width=SIZE, azimuth_start_deg=azimuth)
    direction = 0.3 * np.asarray(right_of_centre, float) / np.linalg.norm(right_of_centre)
    (u, v), = pixel(direction.tolist(), cams)[0]
    assert u > SIZE / 2 + 3, (azimuth, u)
    assert abs(v - SIZE / 2) < 2.0, (azimuth, v)  # horizontal offsets stay near the centre row


def test_viewmats_are_rotations_not_reflections():
    cams = orbit_cameras(7, elevation_deg=-25.0, radius=2.0, width=32, azimuth_start_deg=13.0)
    det = torch.linalg.det(cams.viewmats[:, :3, :3].double())
    assert torch.allclose(det, torch.ones(7, dtype=torch.float64), atol=1e-5)
    c2w = look_at_c2w_gl(np.array([1.0, -2.0, 0.5]), np.zeros(3))
    assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0, abs=1e-9)
    # The OpenGL camera's x axis is right = forward x up (world Z), never its mirror.
    forward = -c2w[:3, 2]
    assert np.allclose(c2w[:3, 0], np.cross(forward, [0.0, 0.0, 1.0]) / np.linalg.norm(np.cross(forward, [0.0, 0.0, 1.0])))


# ---------------------------------------------------------------------------------------------
# Against Blender (the real bpy module)


@pytest.fixture(scope="module")
def blender():
    from blender_session import import_bpy

    bpy = import_bpy()
    from bpy_extras.object_utils import world_to_camera_view

    from im3d_blender import turntable

    return bpy, world_to_camera_view, turntable


VIEWS = [(0.0, 0.0), (0.0, 15.0), (90.0, 10.0), (137.0, -20.0), (250.0, 35.0), (315.0, 5.0)]


@pytest.mark.blender
@pytest.mark.parametrize("azimuth, elevation", VIEWS)
def test_orbit_cameras_project_like_blenders_turntable_camera(blender, azimuth, elevation):
    bpy, world_to_camera_view, turntable = blender
    from mathutils import Vector

    fov, width, height = 35.0, 80, 80
    target = (0.4, -0.7, 0.25)
    radius = 2.2
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    data = bpy.data.cameras.new("cam")
    data.lens_unit, data.sensor_fit, data.angle = "FOV", "AUTO", math.radians(fov)
    camera = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    center = Vector(target)
    camera.matrix_world = turntable.look_at(center + turntable.orbit_position(azimuth, elevation, radius), center)
    bpy.context.view_layer.update()

    ours = orbit_cameras(1, elevation_deg=elevation, radius=radius, fov_deg=fov, width=width, height=height, azimuths_deg=[azimuth], target=target)
    # Same camera-to-world (OpenGL axes) and the same intrinsics as the add-on records.
    blender_c2w = np.array([list(row) for row in camera.matrix_world.normalized()])
    np.testing.assert_allclose(viewmats_to_c2w_gl(ours.viewmats.double())[0].numpy(), blender_c2w, atol=1e-5)
    intrinsics = turntable.camera_intrinsics(data, scene.render)
    K = ours.Ks[0].numpy()
    np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], [intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy")], rtol=1e-5)

    rng = np.random.default_rng(int(azimuth * 10 + elevation))
    points = np.asarray(target) + rng.uniform(-0.5, 0.5, (60, 3))
    pix, depth = project_points(torch.tensor(points, dtype=torch.float32), ours.viewmats, ours.Ks)
    theirs = np.array([list(world_to_camera_view(scene, camera, Vector(p.tolist()))) for p in points])
    np.testing.assert_allclose(pix[0, :, 0].numpy(), theirs[:, 0] * width, atol=2e-3)
    np.testing.assert_allclose(pix[0, :, 1].numpy(), (1.0 - theirs[:, 1]) * height, atol=2e-3)
    np.testing.assert_allclose(depth[0].numpy(), theirs[:, 2], atol=1e-4)

    # Blender's front view: a point on the target's +X side lands right of centre in its image.
    if azimuth == 0.0:
        right = world_to_camera_view(scene, camera, center + Vector((0.3, 0.0, 0.0)))
        assert right.x > 0.55


@pytest.mark.blender
def test_orbit_position_is_the_same_function_on_both_sides(blender):
    _, _, turntable = blender
    for azimuth, elevation in VIEWS + [(-30.0, 80.0)]:
        np.testing.assert_allclose(list(turntable.orbit_position(azimuth, elevation, 1.7)), orbit_position(azimuth, elevation, 1.7), atol=1e-6)


def test_resizing_scales_each_axis_by_its_own_factor():
    """A non-square resize (width kept, height halved) moves rows, not columns."""
    cams = orbit_cameras(3, elevation_deg=10.0, radius=2.0, fov_deg=40.0, width=32, height=16)
    squeezed = cams.resized(32, 8)
    point = torch.tensor([[0.2, 0.1, 0.3]])
    full, _ = project_points(point, cams.viewmats, cams.Ks)
    half, _ = project_points(point, squeezed.viewmats, squeezed.Ks)
    assert torch.allclose(half[..., 0], full[..., 0], atol=1e-5)
    assert torch.allclose(half[..., 1], full[..., 1] / 2, atol=1e-5)
