"""Turntable renders (real bpy + Cycles) and the shipped ground-truth dataset agree with the backend's cameras."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from blender_session import ROOT, import_bpy

bpy = import_bpy()

from mathutils import Euler, Vector  # noqa: E402

from im3d import cameras as backend_cameras  # noqa: E402
from im3d_blender import turntable  # noqa: E402

pytestmark = pytest.mark.blender
SHIPPED = ROOT / "backend" / "im3d" / "data" / "suzanne"


def read_ply_vertices(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header, _, body = data.partition(b"end_header\n")
    count = int(next(line for line in header.decode().splitlines() if line.startswith("element vertex")).split()[-1])
    return np.array(struct.unpack(f"<{3 * count}f", body[: 12 * count]), dtype=np.float32).reshape(count, 3)


def assert_points_inside_masks(dataset, points: np.ndarray, min_fraction: float = 0.995) -> None:
    """Every camera sees the points in front of it, inside the image, on pixels its mask covers."""
    pix, depth = backend_cameras.project_points(
        torch.as_tensor(points, dtype=torch.float32), dataset.cameras.viewmats, dataset.cameras.Ks
    )
    assert bool((depth > 0).all()), "points behind a camera: wrong camera axes or position"
    width, height = dataset.cameras.width, dataset.cameras.height
    cols, rows = pix[..., 0].floor().long(), pix[..., 1].floor().long()
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    assert bool(inside.all()), "points project outside the image: the object does not fit the view"
    for view in range(len(dataset.cameras)):
        # A vertex on the silhouette can land on an anti-aliased edge pixel: look at its 3x3 neighbourhood.
        mask = torch.nn.functional.max_pool2d(dataset.masks[view, None, :, :, 0], 3, stride=1, padding=1)[0]
        covered = mask[rows[view], cols[view]] > 0.5
        fraction = covered.float().mean().item()
        assert fraction >= min_fraction, f"view {view}: only {fraction:.1%} of the points land on the object's mask"


@pytest.mark.parametrize("split, views", [("train", 16), ("test", 8)])
def test_shipped_dataset_loads_and_mesh_projects_into_masks(split, views):
    dataset = backend_cameras.read_transforms(SHIPPED, split)
    assert len(dataset.cameras) == views
    assert (dataset.cameras.width, dataset.cameras.height) == (128, 128)
    assert 0.02 < dataset.masks.mean().item() < 0.6  # an object, not an empty or a full frame
    vertices = read_ply_vertices(SHIPPED / "mesh.ply")
    extent = vertices.max(0) - vertices.min(0)
    assert abs(extent.max() - 1.0) < 1e-3 and np.abs((vertices.max(0) + vertices.min(0)) / 2).max() < 1e-3
    assert_points_inside_masks(dataset, vertices)
    # Held-out views are off the training orbit: other elevations.
    elevations = {round(math.degrees(math.asin(c[2].item() / c.norm().item()))) for c in dataset.cameras.centers()}
    assert elevations == ({15} if split == "train" else {35, -10, 50, 0})


def test_blender_intrinsics_match_the_backend():
    cases = [
        (50.0, 36.0, 24.0, "AUTO", 256, 256, 0.0, 0.0, 1.0),
        (35.0, 36.0, 24.0, "AUTO", 320, 180, 0.1, -0.05, 1.0),
        (35.0, 36.0, 24.0, "AUTO", 180, 320, 0.0, 0.2, 1.0),
        (85.0, 30.0, 20.0, "VERTICAL", 300, 200, 0.05, 0.0, 2.0),
        (24.0, 36.0, 24.0, "HORIZONTAL", 200, 300, 0.0, 0.0, 0.5),
    ]
    for case in cases:
        K = backend_cameras.blender_intrinsics(*case)
        fx, fy, cx, cy = turntable.blender_intrinsics(*case)
        np.testing.assert_allclose([fx, fy, cx, cy], [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], rtol=1e-12, err_msg=str(case))


def test_orbit_convention_matches_the_backend():
    for azimuth, elevation in [(0, 0), (90, 15), (200, -30), (33, 70)]:
        np.testing.assert_allclose(
            turntable.orbit_position(azimuth, elevation, 2.0), backend_cameras.orbit_position(azimuth, elevation, 2.0), atol=1e-6
        )


def test_turntable_of_an_object_away_from_the_origin(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    mesh = bpy.data.meshes.new("box")
    half = (0.6, 0.3, 0.4)  # not a cube, so a wrong axis convention shows
    corners = [(sx * half[0], sy * half[1], sz * half[2]) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    mesh.from_pydata(corners, [], faces)
    box = bpy.data.objects.new("box", mesh)
    bpy.context.scene.collection.objects.link(box)
    box.location = (2.0, -1.0, 0.5)
    box.rotation_euler = Euler((0.2, 0.1, 0.7))
    box.scale = (1.5, 1.0, 1.0)
    bpy.context.view_layer.update()
    scenes_before, cameras_before = len(bpy.data.scenes), len(bpy.data.cameras)

    json_path = turntable.render_turntable([box], tmp_path, num_views=4, elevation_deg=20.0, size=40, samples=2, fov_deg=35.0)

    assert (len(bpy.data.scenes), len(bpy.data.cameras)) == (scenes_before, cameras_before), "temporary scene left behind"
    assert box.name in bpy.context.scene.objects and len(box.users_scene) == 1
    dataset = backend_cameras.read_transforms(json_path)
    assert len(dataset.cameras) == 4 and dataset.cameras.width == 40
    world_corners = np.array([list(box.matrix_world @ Vector(c)) for c in corners], dtype=np.float32)
    assert_points_inside_masks(dataset, world_corners, min_fraction=1.0)

    center = world_corners.min(0) / 2 + world_corners.max(0) / 2
    centers = dataset.cameras.centers().numpy()
    offsets = centers - center
    # Azimuth 0 looks from -Y, then counter-clockwise seen from +Z: -Y, +X, +Y, -X.
    expected_directions = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    horizontal = offsets[:, :2] / np.linalg.norm(offsets[:, :2], axis=1, keepdims=True)
    np.testing.assert_allclose(horizontal, expected_directions, atol=1e-5)
    np.testing.assert_allclose(np.degrees(np.arcsin(offsets[:, 2] / np.linalg.norm(offsets, axis=1))), 20.0, atol=1e-4)
    # Every camera looks at the bounding-box centre: it projects to the image centre.
    pix, _ = backend_cameras.project_points(torch.as_tensor(center[None]), dataset.cameras.viewmats, dataset.cameras.Ks)
    np.testing.assert_allclose(pix[:, 0].numpy(), 20.0, atol=1e-3)
    # The camera recorded for each image is the one that rendered it: its optical axis hits the mask's centroid.
    masks = dataset.masks[..., 0].numpy()
    ys, xs = np.mgrid[0:40, 0:40] + 0.5
    centroids = np.stack([(masks * xs).sum((1, 2)), (masks * ys).sum((1, 2))], 1) / masks.sum((1, 2))[:, None]
    assert np.abs(centroids - 20.0).max() < 5.0


def test_turntable_rejects_bad_input(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    empty = bpy.data.objects.new("empty", None)
    bpy.context.scene.collection.objects.link(empty)
    with pytest.raises(turntable.TurntableError, match="at least one object"):
        turntable.render_turntable([], tmp_path)
    with pytest.raises(turntable.TurntableError, match="render engine 'NOPE'"):
        mesh = bpy.data.meshes.new("tri")
        mesh.from_pydata([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [], [(0, 1, 2)])
        tri = bpy.data.objects.new("tri", mesh)
        bpy.context.scene.collection.objects.link(tri)
        turntable.render_turntable([tri], tmp_path, num_views=1, engine="NOPE")
    assert len(bpy.data.scenes) == 1
    with pytest.raises(turntable.TurntableError, match="views must be at least 1"):
        turntable.orbit_views(0, 10.0)
