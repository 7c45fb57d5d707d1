import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from im3d.cameras import (
    Cameras,
    DatasetError,
    blender_intrinsics,
    c2w_gl_to_viewmats,
    orbit_cameras,
    orbit_position,
    project_points,
    read_transforms,
    viewmats_to_c2w_gl,
    write_transforms,
)


def test_orbit_cameras_look_at_the_target_from_the_right_places():
    cams = orbit_cameras(8, elevation_deg=20.0, radius=3.0, fov_deg=40.0, width=64)
    assert cams.viewmats.shape == (8, 4, 4) and cams.Ks.shape == (8, 3, 3)
    pix, depth = project_points(torch.zeros(1, 3), cams.viewmats, cams.Ks)
    assert torch.allclose(pix, torch.full_like(pix, 32.0), atol=1e-4)  # origin lands at the image centre
    assert torch.allclose(depth, torch.full_like(depth, 3.0), atol=1e-5)
    centers = cams.centers()
    assert torch.allclose(centers.norm(dim=-1), torch.full((8,), 3.0), atol=1e-5)
    assert torch.allclose(centers[0], torch.tensor(orbit_position(0, 20, 3.0), dtype=torch.float32), atol=1e-5)
    assert centers[0, 1] < 0  # azimuth 0 is Blender's front view (-Y)
    assert centers[2, 0] > 0  # a quarter turn later the camera is on +X: counter-clockwise from above
    # World up (+Z) projects upwards in the image (smaller row index).
    up, _ = project_points(torch.tensor([[0.0, 0.0, 0.5]]), cams.viewmats, cams.Ks)
    assert (up[:, 0, 1] < 32).all()


def test_gl_cv_conversions_are_inverse():
    cams = orbit_cameras(5, elevation_deg=-30, radius=2.0, width=32, height=48)
    c2w = viewmats_to_c2w_gl(cams.viewmats.double())
    assert torch.allclose(c2w_gl_to_viewmats(c2w), cams.viewmats.double(), atol=1e-6)
    # An OpenGL camera looks down its -Z axis: the target (origin) is in front.
    forward = -c2w[:, :3, 2]
    to_target = -c2w[:, :3, 3]
    assert (torch.einsum("ci,ci->c", forward, to_target) > 0).all()


def _write_dataset(root, frames, meta, size=(8, 6), mode="RGBA"):
    root.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        path = root / (frame["file_path"] if frame["file_path"].endswith(".png") else frame["file_path"] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        color = (10 * i, 100, 200, 128) if mode == "RGBA" else (10 * i, 100, 200)
        Image.new(mode, size, color).save(path)
    (root / "transforms.json").write_text(json.dumps({**meta, "frames": frames}))


def test_transforms_round_trip(tmp_path):
    cams = orbit_cameras(4, elevation_deg=15, radius=2.5, fov_deg=35, width=8, height=6)
    names = [f"images/{i:03d}.png" for i in range(4)]
    for name in names:
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGBA", (8, 6), (255, 0, 0, 255)).save(tmp_path / name)
    write_transforms(tmp_path / "transforms.json", cams, names, extra={"note": "kept"})
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert {"camera_angle_x", "fl_x", "fl_y", "cx", "cy", "w", "h"} <= set(meta)
    data = read_transforms(tmp_path)
    assert torch.allclose(data.cameras.viewmats, cams.viewmats, atol=1e-5)
    assert torch.allclose(data.cameras.Ks, cams.Ks, atol=1e-4)
    assert (data.cameras.width, data.cameras.height) == (8, 6)
    assert data.images.shape == (4, 6, 8, 3) and data.masks.shape == (4, 6, 8, 1)
    assert data.file_paths == names and data.extra["note"] == "kept"
    # camera_angle_x only (the NeRF-synthetic form) gives the same intrinsics.
    del meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], meta["camera_angle_y"]
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    assert torch.allclose(read_transforms(tmp_path).cameras.Ks, cams.Ks, atol=1e-4)


def test_per_frame_intrinsics_round_trip(tmp_path):
    cams = orbit_cameras(2, width=8, height=6)
    cams.Ks[1, 0, 0] *= 1.5
    names = ["a.png", "b.png"]
    for name in names:
        Image.new("RGB", (8, 6)).save(tmp_path / name)
    write_transforms(tmp_path / "transforms.json", cams, names)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert "fl_x" in meta["frames"][1] and "fl_x" not in meta
    data = read_transforms(tmp_path)
    assert torch.allclose(data.cameras.Ks, cams.Ks, atol=1e-4)
    assert torch.all(data.masks == 1)  # RGB without alpha: everything is foreground


def test_nerf_synthetic_layout_and_alpha(tmp_path):
    c2w = viewmats_to_c2w_gl(orbit_cameras(2, width=8, height=6).viewmats.double()).tolist()
    frames = [{"file_path": f"./train/r_{i}", "transform_matrix": c2w[i]} for i in range(2)]
    root = tmp_path / "lego"
    _write_dataset(root, frames, {"camera_angle_x": 0.69})
    (root / "transforms.json").rename(root / "transforms_train.json")
    data = read_transforms(root)
    assert data.source.name == "transforms_train.json"
    assert torch.allclose(data.masks, torch.full_like(data.masks, 128 / 255), atol=1e-6)
    assert data.composited([1, 1, 1]).max() <= 1.0
    with pytest.raises(DatasetError, match="transforms_test.json"):
        read_transforms(root, split="test")


def test_max_size_downscales_images_and_intrinsics(tmp_path):
    cams = orbit_cameras(2, width=16, height=12)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 12)).save(tmp_path / name)
    write_transforms(tmp_path / "transforms.json", cams, ["a.png", "b.png"])
    data = read_transforms(tmp_path, max_size=8)
    assert data.images.shape == (2, 6, 8, 3)
    assert torch.allclose(data.cameras.Ks[:, 0, 0], cams.Ks[:, 0, 0] / 2)


def _good_frames():
    c2w = viewmats_to_c2w_gl(orbit_cameras(2, width=8, height=6).viewmats.double()).tolist()
    return [{"file_path": f"{i}.png", "transform_matrix": c2w[i]} for i in range(2)]


def test_missing_image_is_named(tmp_path):
    frames = _good_frames()
    _write_dataset(tmp_path, frames, {"camera_angle_x": 0.7})
    (tmp_path / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"1\.png: image file is missing \(listed as frames\[1\]\.file_path"):
        read_transforms(tmp_path)


def test_malformed_json_is_named(tmp_path):
    (tmp_path / "transforms.json").write_text('{"frames": [')
    with pytest.raises(DatasetError, match=r"transforms\.json: is not valid JSON"):
        read_transforms(tmp_path)
    (tmp_path / "transforms.json").write_text('{"frames": []}')
    with pytest.raises(DatasetError, match="has no 'frames' list"):
        read_transforms(tmp_path)


def test_mixed_image_sizes_are_named(tmp_path):
    frames = _good_frames()
    _write_dataset(tmp_path, frames, {"camera_angle_x": 0.7})
    Image.new("RGBA", (9, 6)).save(tmp_path / "1.png")
    with pytest.raises(DatasetError, match=r"1\.png: is 9x6 but 0\.png is 8x6"):
        read_transforms(tmp_path)


def test_singular_matrix_is_named(tmp_path):
    frames = _good_frames()
    frames[1]["transform_matrix"] = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    _write_dataset(tmp_path, frames, {"camera_angle_x": 0.7})
    with pytest.raises(DatasetError, match=r"frames\[1\]\.transform_matrix is not invertible"):
        read_transforms(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m, f: f[0].update(transform_matrix=[[1, 2], [3, 4]]), r"frames\[0\]\.transform_matrix must be 4x4"),
        (lambda m, f: f[0].update(transform_matrix=[["a"] * 4] * 4), r"not a matrix of numbers"),
        (lambda m, f: m.pop("camera_angle_x"), r"no intrinsics for frames\[0\]"),
        (lambda m, f: m.update(w=100), r"'w' is 100 but the image of frames\[0\] is 8x6"),
        (lambda m, f: f[1].pop("file_path"), r"frames\[1\] needs 'file_path' and 'transform_matrix'"),
        (lambda m, f: m.update(camera_angle_x="wide"), r"'camera_angle_x' \(for frames\[0\]\) must be a finite number"),
    ],
)
def test_other_bad_datasets(tmp_path, mutate, message):
    frames, meta = _good_frames(), {"camera_angle_x": 0.7}
    _write_dataset(tmp_path, frames, meta)
    mutate(meta, frames)
    (tmp_path / "transforms.json").write_text(json.dumps({**meta, "frames": frames}))
    with pytest.raises(DatasetError, match=message):
        read_transforms(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    _write_dataset(tmp_path, _good_frames(), {"camera_angle_x": 0.7})
    (tmp_path / "0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"0\.png: is not a readable image"):
        read_transforms(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        read_transforms(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no transforms.json or transforms_train.json"):
        read_transforms(tmp_path)


# ---------------------------------------------------------------------------------------------
# Agreement with Blender's own projection (the real bpy module).

CASES = [
    # (width, height, sensor_fit, lens, sensor_w, sensor_h, shift_x, shift_y)
    (640, 480, "AUTO", 50.0, 36.0, 24.0, 0.0, 0.0),
    (480, 640, "AUTO", 35.0, 36.0, 24.0, 0.1, -0.05),
    (256, 256, "HORIZONTAL", 24.0, 32.0, 18.0, -0.2, 0.15),
    (300, 200, "VERTICAL", 85.0, 36.0, 24.0, 0.05, 0.3),
    (200, 300, "VERTICAL", 30.0, 20.0, 30.0, 0.0, 0.1),
    (123, 77, "HORIZONTAL", 18.0, 36.0, 24.0, 0.25, 0.0),
]


@pytest.mark.blender
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}-{c[2]}" for c in CASES])
def test_projection_matches_blender(case):
    bpy = pytest.importorskip("bpy")
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Euler, Vector

    width, height, fit, lens, sensor_w, sensor_h, shift_x, shift_y = case
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    cam_data = bpy.data.cameras.new("cam")
    cam_data.lens, cam_data.sensor_width, cam_data.sensor_height = lens, sensor_w, sensor_h
    cam_data.sensor_fit, cam_data.shift_x, cam_data.shift_y = fit, shift_x, shift_y
    cam = bpy.data.objects.new("cam", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam

    rng = np.random.default_rng(width * 7 + height)
    cam.location = Vector(rng.uniform(-3, 3, 3).tolist())
    cam.rotation_euler = Euler(rng.uniform(-math.pi, math.pi, 3).tolist())
    bpy.context.view_layer.update()

    c2w = torch.tensor([list(row) for row in cam.matrix_world], dtype=torch.float64)[None]
    K = torch.tensor(blender_intrinsics(lens, sensor_w, sensor_h, fit, width, height, shift_x, shift_y))[None]
    viewmats = c2w_gl_to_viewmats(c2w)

    # Points in front of the camera whose projections spread over the frame and a margin around it.
    z = rng.uniform(0.5, 10.0, 200)
    u, v = rng.uniform(-0.1, 1.1, 200) * width, rng.uniform(-0.1, 1.1, 200) * height
    Kn = K[0].numpy()
    local = np.stack([(u - Kn[0, 2]) / Kn[0, 0] * z, -(v - Kn[1, 2]) / Kn[1, 1] * z, -z], -1)
    world = (c2w[0].numpy() @ np.concatenate([local, np.ones((200, 1))], -1).T).T[:, :3]
    ours, depth = project_points(torch.tensor(world), viewmats, K)
    theirs = []
    for point in world:
        ndc = world_to_camera_view(scene, cam, Vector(point.tolist()))
        theirs.append([ndc.x * width, (1.0 - ndc.y) * height, ndc.z])
    theirs = np.array(theirs)
    # Blender projects in single precision: compare where its numbers are meaningful, the frame
    # and a margin around it.
    inside = (theirs[:, 0] > -0.1 * width) & (theirs[:, 0] < 1.1 * width)
    inside &= (theirs[:, 1] > -0.1 * height) & (theirs[:, 1] < 1.1 * height)
    assert inside.sum() >= 100
    assert np.abs(ours[0].numpy()[inside] - theirs[inside, :2]).max() < 1e-3
    assert np.allclose(depth[0].numpy(), theirs[:, 2], atol=1e-6)


def test_cameras_indexing_and_resizing():
    cams = orbit_cameras(4, width=32, height=16)
    assert len(cams[1]) == 1 and len(cams[[0, 2]]) == 2
    half = cams.resized(16, 8)
    pix_full, _ = project_points(torch.tensor([[0.2, 0.1, 0.3]]), cams.viewmats, cams.Ks)
    pix_half, _ = project_points(torch.tensor([[0.2, 0.1, 0.3]]), half.viewmats, half.Ks)
    assert torch.allclose(pix_half * 2, pix_full, atol=1e-4)
    assert isinstance(cams.to("cpu"), Cameras)
