"""The installed extension against a real backend process (python -m im3d.server, real pipeline, CPU).

Refine Selected with diffusion off (a reconstruction of the turntable renders), Generate with tiny
randomly initialised diffusion models, Cancel, and a backend killed mid-job. Tiny overrides keep
each job to seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from blender_session import import_bpy
from test_blender_addon import PACKAGE, free_port, fresh_scene, install_extension

bpy = import_bpy()

from mathutils import Vector  # noqa: E402

pytestmark = pytest.mark.blender

TINY = {
    "recon": {"steps": 40, "refine_steps": 10, "image_size": 64, "init_points": 800, "lpips_weight": 0.0, "msssim_weight": 0.0, "l1_weight": 1.0},
    "mesh": {"grid_resolution": 48, "face_budget": 3000, "texture_size": 512},
    "pipeline": {"refinement_rounds": 0, "preview_every": 10},
}


def modules():
    return sys.modules[f"{PACKAGE}.runtime"], sys.modules[f"{PACKAGE}.local_backend"]


def configure(tmp_path_factory):
    install_extension(tmp_path_factory.mktemp("dist"))
    runtime, local = modules()
    local.stop_backend()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.python_path, prefs.port, prefs.device, prefs.auto_start = "LOCAL", sys.executable, free_port(), "cpu", True
    return runtime, prefs


@pytest.fixture(scope="module")
def slow_backend(tmp_path_factory):
    """The real server process with a runner that works until it is cancelled (the kill test runs last)."""
    runtime, prefs = configure(tmp_path_factory)
    local = modules()[1]
    process = local.local_process(prefs)
    process.extra_args = ["--runner", "blender_slow_runner:run"]
    process.extra_env = {"PYTHONPATH": str(Path(__file__).resolve().parent)}
    process.start()
    process.wait_ready(60)
    yield runtime
    local.stop_backend()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    try:
        import im3d.server  # noqa: F401
        from im3d.mesh import mesh_from_splats  # noqa: F401
    except ImportError as error:
        pytest.skip(f"the backend's pipeline is not complete yet ({error})")
    install_extension(tmp_path_factory.mktemp("dist"))
    runtime, local = modules()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.python_path, prefs.port, prefs.device, prefs.auto_start = "LOCAL", sys.executable, free_port(), "cpu", True
    models = tmp_path_factory.mktemp("models")
    from im3d.testing.tiny_models import build_orbit_model, build_text_to_image_model

    prefs.text_to_image_model = str(build_text_to_image_model(models / "t2i"))
    prefs.orbit_model = str(build_orbit_model(models / "orbit"))
    yield runtime
    local.stop_backend()


def refine_setup(scene, steps_scale: int = 1, location=(1.0, 2.0, 0.5), rotation=(0.0, 0.0, 0.5)):
    bpy.ops.mesh.primitive_cube_add(size=0.8, location=location)
    cube = bpy.context.active_object
    cube.rotation_euler = rotation
    material = bpy.data.materials.new("orange")
    material.diffuse_color = (1.0, 0.4, 0.1, 1.0)
    principled = material.node_tree.nodes.get("Principled BSDF")
    principled.inputs["Base Color"].default_value = (1.0, 0.4, 0.1, 1.0)
    cube.data.materials.append(material)
    state = scene.im3d
    state.refine_use_diffusion, state.keep_original, state.preset = False, False, "FAST"
    state.turntable_views, state.turntable_size, state.turntable_samples = 8, 64, 4
    overrides = json.loads(json.dumps(TINY))
    overrides["recon"]["steps"] *= steps_scale
    state.advanced_overrides = json.dumps(overrides)
    return cube


def assert_textured_result(obj, name):
    assert obj.name == name
    assert obj.users_collection[0].name == "IM-3D"
    assert obj.type == "MESH" and len(obj.data.polygons) > 10
    material = obj.active_material
    assert material is not None and material.name == name
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image is not None]
    assert images and images[0].size[0] >= 64 and images[0].packed_file is not None
    assert any(n.type == "BSDF_PRINCIPLED" for n in material.node_tree.nodes)
    assert obj["im3d_job_id"] and obj["im3d_preset"] == "fast"


@pytest.mark.slow  # the real pipeline: numba JIT + fitting on CPU take minutes on 2 cores
def test_refine_selected_puts_the_refined_copy_beside_the_original(backend):
    scene = fresh_scene()
    cube = refine_setup(scene, location=(40.0, -25.0, 8.0), rotation=(0.3, -0.2, 1.1))  # far from the origin, rotated
    assert bpy.ops.im3d.refine_selected() == {"FINISHED"}, scene.im3d.job_error
    name = f"{cube.name} refined"  # "Cube.001 refined": the start-up scene has a "Cube" already
    result = bpy.data.objects[name]
    assert_textured_result(result, name)
    assert result["im3d_kind"] == "refine"
    # The original's transform, moved aside along +X; the geometry lands on the cube's shape.
    offset = result.matrix_world.translation - cube.matrix_world.translation
    assert offset.x > 0.5 and abs(offset.y) < 1e-6 and abs(offset.z) < 1e-6
    rotation_gap = result.matrix_world.to_3x3() - cube.matrix_world.to_3x3()
    assert max(abs(x) for row in rotation_gap for x in row) < 1e-6
    world = [result.matrix_world @ v.co - offset for v in result.data.vertices]
    center = sum(world, Vector()) / len(world)
    assert (center - cube.matrix_world.translation).length < 0.15, center
    assert cube.hide_get() and cube.hide_render  # keep_original off
    assert len(scene.im3d_history) == 1 and scene.im3d_history[0].kind == "refine"
    # Re-import from the history re-verifies the kept files and puts the object back where it was made.
    bounds = [tuple(result.matrix_world @ v.co) for v in result.data.vertices[:50]]
    bpy.data.objects.remove(result)
    assert bpy.ops.im3d.reimport() == {"FINISHED"}
    again = bpy.data.objects[name]
    assert again["im3d_source"] == cube.name and len(again.data.vertices) >= 50
    assert max(abs(a - b) for p, q in zip(bounds, (again.matrix_world @ v.co for v in again.data.vertices[:50])) for a, b in zip(p, q)) < 1e-4
    assert bpy.ops.im3d.reimport() == {"FINISHED"}  # with the copy still there: a second one beside it
    assert len([o for o in bpy.data.collections["IM-3D"].objects]) == 2


@pytest.mark.slow
def test_generate_with_tiny_models_puts_a_mesh_at_the_cursor(backend):
    scene = fresh_scene()
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    scene.cursor.location = (3.0, -1.0, 0.0)
    state = scene.im3d
    state.prompt, state.seed, state.preset = "a small blue chair", 7, "FAST"
    overrides = json.loads(json.dumps(TINY))
    overrides["diffusion"] = {"num_views": 4, "image_size": 64, "orbit_steps": 2, "text_to_image_steps": 1}
    state.advanced_overrides = json.dumps(overrides)
    try:
        result = bpy.ops.im3d.generate()
    except RuntimeError as error:
        if "no_object_found" in str(error) or "no object" in str(error).lower():
            pytest.skip(f"random tiny models drew nothing the pipeline could mesh: {error}")
        raise
    assert result == {"FINISHED"}
    obj = bpy.data.objects["a small blue chair"]
    assert_textured_result(obj, "a small blue chair")
    assert (obj.matrix_world.translation - Vector((3.0, -1.0, 0.0))).length < 1e-6
    assert obj["im3d_prompt"] == "a small blue chair" and obj["im3d_seed"] == 7


def runtime_cancel():
    # The panel's Cancel button; poll() is not in the way while a job runs.
    assert bpy.ops.im3d.cancel() == {"FINISHED"}


def pump_until_done(runtime, timeout=120.0, on_running=None):
    deadline = time.monotonic() + timeout
    while runtime.Jobs.active is not None:
        runtime.pump()
        run = runtime.Jobs.active.run if runtime.Jobs.active is not None else None
        if on_running is not None and run is not None:
            status = run.status
            if status and status.get("state") == "running":
                on_running()
                on_running = None
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)


def test_cancel_stops_the_job_on_the_backend(slow_backend):
    backend = slow_backend
    scene = fresh_scene()
    refine_setup(scene)
    objects_before = set(bpy.data.objects)
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow = backend.Jobs.active
    pump_until_done(backend, on_running=lambda: runtime_cancel())
    assert scene.im3d.job_state == "cancelled"
    assert set(bpy.data.objects) == objects_before
    status = modules()[1].client(bpy.context.preferences.addons[PACKAGE].preferences).job(flow.run.job_id)
    assert status["state"] == "cancelled"


def test_starting_the_backend_never_blocks_blender_and_the_job_goes_when_it_is_ready(slow_backend):
    """The first job of a session starts the backend in a worker thread: every timer tick stays short,
    the panel says "Starting the backend…", and the job is sent once /v1/health answers."""
    runtime, local = modules()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    local.stop_backend()
    process = local.local_process(prefs)
    process.extra_args = ["--runner", "blender_slow_runner:run"]
    process.extra_env = {"PYTHONPATH": str(Path(__file__).resolve().parent)}
    scene = fresh_scene()
    refine_setup(scene)  # diffusion and LPIPS off: no model weights needed
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow, stages, ticks = runtime.Jobs.active, set(), []
    deadline = time.monotonic() + 90
    while flow.run is None or flow.run.job_id is None:
        start = time.perf_counter()
        preparing = flow.phase == "preparing"
        runtime.pump()
        if preparing:
            ticks.append(time.perf_counter() - start)
        stages.add(scene.im3d.job_stage)
        assert runtime.Jobs.active is flow, scene.im3d.job_error
        assert time.monotonic() < deadline, "the job never reached the backend"
        time.sleep(0.05)
    assert "Starting the backend…" in stages and process.running() and process.ready
    assert max(ticks) < 0.25, f"a timer tick blocked Blender for {max(ticks):.2f} s"
    pump_until_done(runtime, on_running=runtime_cancel)
    assert scene.im3d.job_state == "cancelled"


def test_the_panel_takes_preset_values_from_the_backend_instead_of_repeating_them(slow_backend):
    """What the backend answered on GET /v1/presets (learnt while getting ready) fills Custom Settings."""
    from im3d.config import load_config

    runtime, local = modules()
    values = local.preset_values("fast")
    if local.Backend.presets is None:
        pytest.fail("the backend's presets were not learnt while it got ready (GET /v1/presets)")
    fast, high = load_config("fast"), load_config("high")
    assert values["recon"]["steps"] == fast.recon.steps and values["mesh"]["face_budget"] == fast.mesh.face_budget
    state = fresh_scene().im3d
    state.preset = "HIGH"
    state.use_custom_settings = True  # starts from the backend's High values
    assert (state.refinement_rounds, state.face_budget, state.texture_size) == (
        high.pipeline.refinement_rounds, high.mesh.face_budget, str(high.mesh.texture_size),
    )


def test_killed_backend_gives_a_clear_error_and_leaves_the_scene_unchanged(slow_backend):
    backend = slow_backend
    scene = fresh_scene()
    refine_setup(scene)
    objects_before = set(bpy.data.objects)
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    process = modules()[1].Backend.process
    pump_until_done(backend, on_running=lambda: process.process.kill())
    assert scene.im3d.job_state == "failed"
    assert "stopped answering" in scene.im3d.job_error
    assert set(bpy.data.objects) == objects_before
