"""The artist's path in real Blender (the installed extension zip), against a protocol double or no backend.

- a foreign program on the configured port → "port N is used by another program…", status never "running";
- Refine Selected on objects far from the origin and rotated → the copies land beside them, and a
  re-import from the history gives the same world bounds and the full name (and goes beside a copy
  still in the scene rather than on it); several selected objects are refined one after another;
- Cancel during the turntable → no temporary scene, camera, world or views left, nothing sent;
  while a job runs the buttons are disabled and say why;
- every RNA property the add-on registers has a description; units and subtypes where they apply.

The double speaks protocol v1 and answers each refine job with a GLB of the object named in the
uploaded turntable's transforms.json, exported beforehand with its world transform: what the real
backend returns (geometry in the cameras' world frame), in milliseconds.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from blender_session import import_bpy
from im3d.testing.fake_http import JsonHandler
from test_blender_addon import PACKAGE, fresh_scene, install_extension

bpy = import_bpy()

from mathutils import Vector  # noqa: E402

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def addon(tmp_path_factory):
    install_extension(tmp_path_factory.mktemp("dist"))
    return sys.modules[f"{PACKAGE}.runtime"], sys.modules[f"{PACKAGE}.local_backend"]


def prefs():
    return bpy.context.preferences.addons[PACKAGE].preferences


# ----------------------------------------------------------------------------------------------
# A backend double


class Double(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), DoubleHandler)
        self.glbs: dict[str, bytes] = {}  # object name → GLB in world frame
        self.uploads: dict[str, str] = {}  # upload id → object name
        self.jobs: dict[str, bytes] = {}
        self.created = 0
        self.models: dict | None = None  # GET /v1/models answer; None: an older backend without the route (404)
        self.fail: dict | None = None  # {"code", "message"}: every job fails with it
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class DoubleHandler(JsonHandler):

    def do_GET(self):
        server: Double = self.server
        parts = self.path.strip("/").split("/")
        if self.path == "/v1/health":
            return self.send_json(200, {"version": "double", "protocol": 1, "device": "cpu", "models_loaded": [], "queue_length": 0, "running_job": None})
        if self.path.startswith("/v1/models?") and server.models is not None:
            return self.send_json(200, server.models)
        if len(parts) == 3 and parts[1] == "jobs" and parts[2] in server.jobs:
            glb = server.jobs[parts[2]]
            if server.fail is not None:
                return self.send_json(200, {
                    "id": parts[2], "kind": "refine", "state": "failed", "stage": "fit", "progress": 0.1, "message": "", "eta_s": None,
                    "error": server.fail, "previews": [], "artifacts": [],
                })
            return self.send_json(200, {
                "id": parts[2], "kind": "refine", "state": "succeeded", "stage": "export", "progress": 1.0, "message": "", "eta_s": None,
                "error": None, "previews": [], "artifacts": [{"name": "mesh.glb", "size": len(glb), "sha256": hashlib.sha256(glb).hexdigest()}],
            })
        if len(parts) == 5 and parts[3] == "artifacts" and parts[2] in server.jobs:
            glb = server.jobs[parts[2]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(glb)))
            self.end_headers()
            return self.wfile.write(glb)
        self.send_json(404, {"error": {"code": "not_found", "message": f"no route {self.path}"}})

    def do_POST(self):
        server: Double = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/uploads":
            with zipfile.ZipFile(io.BytesIO(body)) as archive:
                meta = json.loads(archive.read("transforms.json"))
            upload = f"up{len(server.uploads)}"
            server.uploads[upload] = meta["im3d"]["objects"][0]
            return self.send_json(201, {"upload_id": upload})
        if self.path == "/v1/jobs":
            request = json.loads(body)
            server.requests.append(request)
            server.created += 1
            job = f"job{server.created}"
            server.jobs[job] = server.glbs[server.uploads[request["views"]]]
            return self.send_json(201, {"id": job})
        self.send_json(404, {"error": {"code": "not_found", "message": "no route"}})


def world_glb(obj, folder: Path) -> bytes:
    """`obj` exported with its world transform: geometry in Blender's world frame, like the backend's result."""
    for other in bpy.context.scene.objects:
        other.select_set(other == obj)
    path = folder / f"{obj.name}.glb"
    bpy.ops.export_scene.gltf(filepath=str(path), use_selection=True, export_format="GLB")
    return path.read_bytes()


def world_bounds(obj):
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    return [min(c[i] for c in corners) for i in range(3)], [max(c[i] for c in corners) for i in range(3)]


def vertex_bounds(obj):
    points = [obj.matrix_world @ v.co for v in obj.data.vertices]
    return [min(p[i] for p in points) for i in range(3)], [max(p[i] for p in points) for i in range(3)]


def close(a, b, tol=1e-4) -> bool:
    return all(abs(x - y) <= tol for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def far_rotated_cube(name: str, location, rotation, size: float = 0.8):
    bpy.ops.mesh.primitive_cube_add(size=size, location=location, rotation=rotation)
    cube = bpy.context.active_object
    cube.name = cube.data.name = name
    return cube


def select_only(target) -> None:
    """`target` alone selected, and active: what Refine Selected works on."""
    for obj in bpy.context.scene.objects:
        obj.select_set(obj == target)
    bpy.context.view_layer.objects.active = target


def quick_turntable(state):
    state.refine_use_diffusion, state.keep_original, state.preset = False, True, "FAST"
    state.turntable_views, state.turntable_size, state.turntable_samples = 4, 64, 1


@pytest.fixture
def double(addon):
    server = Double()
    p = prefs()
    p.backend_mode, p.url, p.token = "REMOTE", server.url, "x" * 20
    yield server
    p.backend_mode = "LOCAL"
    server.stop()


# ----------------------------------------------------------------------------------------------
# The port


def test_a_foreign_http_server_on_the_port_is_named_and_never_shown_running(addon, tmp_path):
    runtime, local = addon
    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # 404 pages in HTML
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    local.stop_backend()
    p = prefs()
    p.backend_mode, p.python_path, p.port, p.auto_start = "LOCAL", sys.executable, port, True
    scene = fresh_scene()
    scene.im3d.prompt = "a red teapot"
    try:
        with pytest.raises(RuntimeError, match=f"port {port} is used by another program; pick another port in Preferences"):
            bpy.ops.im3d.generate()
        status = local.Backend.process.status_text()
        assert not status.startswith("running") and f"port {port} is used by another program" in status
        assert local.Backend.process.process is None  # nothing was spawned onto a port that is taken
    finally:
        foreign.shutdown()
        foreign.server_close()
        local.stop_backend()
        p.property_unset("port")


def test_a_port_taken_after_the_check_shows_the_backends_own_last_log_line(addon):
    """The backend is spawned (the port looked free: bound, not listening) and exits with 'address in use'."""
    runtime, local = addon
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no listen(): connections are refused, but nobody else can bind it
    port = holder.getsockname()[1]
    local.stop_backend()
    p = prefs()
    p.backend_mode, p.python_path, p.port, p.auto_start = "LOCAL", sys.executable, port, True
    try:
        assert bpy.ops.im3d.backend_start.poll()
        with pytest.raises(RuntimeError, match=f"port {port} is used by another program.*the backend's log: .*{port}"):
            bpy.ops.im3d.backend_start()
        process = local.Backend.process
        assert process.process is not None and process.process.poll() is not None  # it ran, and exited
        status = process.status_text()
        assert status.startswith("exited with code 2: port") and not status.startswith("running")
    finally:
        holder.close()
        local.stop_backend()
        p.property_unset("port")


# ----------------------------------------------------------------------------------------------
# Refine, placement, re-import


def test_refine_far_from_the_origin_and_reimport_from_history_restores_bounds_and_name(double, tmp_path):
    scene = fresh_scene()
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    cube = far_rotated_cube("Cube.001", (40.0, -25.0, 8.0), (0.3, -0.2, 1.1))
    double.glbs[cube.name] = world_glb(cube, tmp_path)
    select_only(cube)
    quick_turntable(scene.im3d)
    objects_before = set(bpy.data.objects)

    assert bpy.ops.im3d.refine_selected() == {"FINISHED"}, scene.im3d.job_error
    (result,) = set(bpy.data.objects) - objects_before
    assert result.name == "Cube.001 refined" and result["im3d_source"] == "Cube.001" and result["im3d_job_id"] == "job1"
    # The copy has the original's rotation and sits beside it along +X; its shape is the cube's.
    rotation_gap = result.matrix_world.to_3x3() - cube.matrix_world.to_3x3()
    assert max(abs(x) for row in rotation_gap for x in row) < 1e-5
    offset = result.matrix_world.translation - cube.matrix_world.translation
    assert offset.x > 0.5 and abs(offset.y) < 1e-5 and abs(offset.z) < 1e-5
    low, high = vertex_bounds(result)
    cube_low, cube_high = vertex_bounds(cube)
    assert close((low, high), ([a + offset.x * (i == 0) for i, a in enumerate(cube_low)], [a + offset.x * (i == 0) for i, a in enumerate(cube_high)]), 1e-3)
    bounds, name = vertex_bounds(result), result.name
    entry = scene.im3d_history[scene.im3d_history_index]
    assert (entry.name, entry.source_object, entry.kind) == ("Cube.001 refined", "Cube.001", "refine")

    # Deleted, then re-imported from the history: the same place, size and full name.
    bpy.data.objects.remove(result)
    assert bpy.ops.im3d.reimport() == {"FINISHED"}
    (again,) = set(bpy.data.objects) - objects_before
    assert again.name == name and close(vertex_bounds(again), bounds)
    assert again["im3d_source"] == "Cube.001" and again["im3d_job_id"] == "job1"

    # Re-imported while that copy is still there: beside it, not on top of it.
    assert bpy.ops.im3d.reimport() == {"FINISHED"}
    (third,) = set(bpy.data.objects) - objects_before - {again}
    low3, high3 = vertex_bounds(third)
    assert low3[0] >= bounds[1][0] - 1e-4  # entirely to the right of the first copy
    assert third.name.startswith(name)


def test_several_selected_objects_are_refined_in_turn_and_a_second_refine_does_not_stack(double, tmp_path):
    scene = fresh_scene()
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    a = far_rotated_cube("Crate", (-12.0, 3.0, 1.0), (0.0, 0.0, 0.4))
    b = far_rotated_cube("Barrel", (5.0, 30.0, -2.0), (0.5, 0.0, 0.0), size=1.2)
    for obj in (a, b):
        double.glbs[obj.name] = world_glb(obj, tmp_path)
    for obj in (a, b):
        obj.select_set(True)
    bpy.context.view_layer.objects.active = b
    quick_turntable(scene.im3d)
    assert bpy.ops.im3d.refine_selected() == {"FINISHED"}, scene.im3d.job_error
    assert double.created == 2 and {"Crate refined", "Barrel refined"} <= set(bpy.data.objects.keys())
    assert "Barrel refined" in scene.im3d.job_message and "Crate refined" in scene.im3d.job_message
    first = bpy.data.objects["Crate refined"]
    # Refine the crate again: the new copy goes beside the first copy, not onto it.
    select_only(a)
    assert bpy.ops.im3d.refine_selected() == {"FINISHED"}, scene.im3d.job_error
    second = bpy.data.objects["Crate refined.001"]
    assert vertex_bounds(second)[0][0] >= vertex_bounds(first)[1][0] - 1e-4


# ----------------------------------------------------------------------------------------------
# One bar, one Cancel


def test_cancel_during_the_turntable_leaves_nothing_behind_and_buttons_say_why_they_are_off(addon, double):
    runtime, local = addon
    scene = fresh_scene()
    cube = far_rotated_cube("Statue", (3.0, 4.0, 1.0), (0.0, 0.2, 0.0))
    select_only(cube)
    quick_turntable(scene.im3d)
    scene.im3d.turntable_views = 8
    before = {kind: set(getattr(bpy.data, kind)) for kind in ("objects", "scenes", "cameras", "worlds", "meshes", "images")}

    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow = runtime.Jobs.active
    deadline = time.monotonic() + 60
    while not (flow.phase == "turntable" and flow.next_view >= 2):
        runtime.pump()
        assert runtime.Jobs.active is flow and time.monotonic() < deadline, scene.im3d.job_error
        time.sleep(0.01)
    assert "IM3D Turntable" in bpy.data.scenes  # really mid-turntable
    assert "view 2 of 8" in scene.im3d.job_stage and 0.0 < scene.im3d.job_progress < 1.0
    views = Path(flow.target.views_dir)
    assert any(views.rglob("*.png"))
    # While it runs: Generate and Refine are off and say why.
    scene.im3d.prompt = "a statue"
    with pytest.raises(RuntimeError, match="A job is running: wait for it or press Cancel"):
        bpy.ops.im3d.generate()
    assert not bpy.ops.im3d.refine_selected.poll()

    assert bpy.ops.im3d.cancel() == {"FINISHED"}
    runtime.pump()
    assert runtime.Jobs.active is None and scene.im3d.job_state == "cancelled"
    after = {kind: set(getattr(bpy.data, kind)) for kind in before}
    assert after == before  # no temporary scene, camera, world, object or image left
    assert not views.exists() and double.created == 0 and not double.uploads
    assert bpy.ops.im3d.generate.poll()  # the buttons are back


def test_deleting_the_object_mid_turntable_ends_the_job_cleanly(addon, double):
    runtime, local = addon
    scene = fresh_scene()
    cube = far_rotated_cube("Vase", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    select_only(cube)
    quick_turntable(scene.im3d)
    scenes_before = set(bpy.data.scenes)
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow = runtime.Jobs.active
    while not (flow.phase == "turntable" and flow.next_view >= 1):
        runtime.pump()
    bpy.data.objects.remove(cube)
    runtime.pump()
    assert runtime.Jobs.active is None and scene.im3d.job_state == "failed"
    assert "'Vase' was deleted while its turntable rendered" in scene.im3d.job_error
    assert set(bpy.data.scenes) == scenes_before and double.created == 0 and bpy.ops.im3d.generate.poll()


# ----------------------------------------------------------------------------------------------
# No weights at all: LPIPS


def selected_statue(scene):
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    cube = far_rotated_cube("Statue", (3.0, 4.0, 1.0), (0.0, 0.2, 0.0))
    cube.select_set(True)
    bpy.context.view_layer.objects.active = cube
    quick_turntable(scene.im3d)
    return cube


def test_a_missing_lpips_backbone_is_said_before_the_turntable_and_the_fallback_works(addon, double, tmp_path):
    runtime, local = addon
    scene = fresh_scene()
    cube = selected_statue(scene)
    double.glbs[cube.name] = world_glb(cube, tmp_path)
    double.models = {"preset": "fast", "models": [{"name": "lpips-vgg", "status": "missing"}], "missing": ["lpips-vgg"], "pull_command": "im3d models pull lpips-vgg"}
    scenes_before = set(bpy.data.scenes)
    with pytest.raises(RuntimeError, match="LPIPS backbone.*Preferences → Add-ons → IM-3D → Models.*untick 'Perceptual Loss \\(LPIPS\\)'"):
        bpy.ops.im3d.refine_selected()
    assert not double.uploads and set(bpy.data.scenes) == scenes_before  # said before any turntable render
    # The visible fallback: untick Perceptual Loss; the job then asks for a fit without LPIPS.
    scene.im3d.use_lpips = False
    assert bpy.ops.im3d.refine_selected() == {"FINISHED"}, scene.im3d.job_error
    assert double.requests[-1]["overrides"]["recon"]["lpips_weight"] == 0.0
    assert "Statue refined" in bpy.data.objects
    local.Backend.lpips_missing, local.Backend.missing = False, []


def test_an_older_backend_teaches_the_missing_lpips_once_and_the_next_click_says_it_first(addon, double, tmp_path):
    """Without GET /v1/models the first job fails with the backend's model_not_found; the add-on words it for
    the panel (not a config key) and says it before the turntable the next time."""
    runtime, local = addon
    local.Backend.lpips_missing, local.Backend.missing = False, []
    scene = fresh_scene()
    cube = selected_statue(scene)
    double.glbs[cube.name] = world_glb(cube, tmp_path)
    double.fail = {"code": "model_not_found", "message": "LPIPS backbone weights vgg16-397923af.pth not found; set recon.lpips_weight=0"}
    with pytest.raises(RuntimeError, match="untick 'Perceptual Loss"):
        bpy.ops.im3d.refine_selected()
    assert "recon.lpips_weight" not in scene.im3d.job_error and len(double.uploads) == 1
    with pytest.raises(RuntimeError, match="untick 'Perceptual Loss"):
        bpy.ops.im3d.refine_selected()
    assert len(double.uploads) == 1  # the second click stopped before rendering and uploading
    local.Backend.lpips_missing = False


# ----------------------------------------------------------------------------------------------
# Properties


def registered_properties():
    """Every property the add-on declares (its classes' annotations), as Blender registered it."""
    classes = []
    for name in ("properties", "preferences", "operators", "ui", "models_ui"):
        module = sys.modules.get(f"{PACKAGE}.{name}")
        assert module is not None or name == "models_ui", name  # models_ui: when this version has it
        classes += getattr(module, "classes", ())
    for cls in classes:
        declared = [k for k in getattr(cls, "__annotations__", {}) if not k.startswith("_")]
        if issubclass(cls, bpy.types.Operator):
            module, _, function = cls.bl_idname.partition(".")
            rna = getattr(getattr(bpy.ops, module), function).get_rna_type()
        else:
            rna = cls.bl_rna
        for identifier in declared:
            yield f"{cls.__name__}.{identifier}", rna.properties[identifier]
    for identifier in ("im3d", "im3d_history", "im3d_history_index"):
        yield f"Scene.{identifier}", bpy.types.Scene.bl_rna.properties[identifier]


def test_every_registered_property_has_a_tooltip_and_units(addon):
    props = dict(registered_properties())
    assert len(props) > 40
    missing = sorted(name for name, prop in props.items() if not prop.description.strip())
    assert not missing, f"properties without a tooltip: {missing}"
    settings = bpy.types.Scene.bl_rna.properties["im3d"].fixed_type.bl_rna.properties
    assert settings["turntable_size"].subtype == "PIXEL"
    assert settings["turntable_elevation"].subtype == "ANGLE" and settings["turntable_elevation"].unit == "ROTATION"
    assert settings["refine_strength"].subtype == "FACTOR"
    enum = settings["texture_size"]
    assert all(item.description for item in enum.enum_items)


# ----------------------------------------------------------------------------------------------
# Drawing (headless Blender has no UI: draw into a recording layout)


class RecordingLayout:
    """Accepts every UILayout call and records labels and progress texts, so draw() code runs headless."""

    def __init__(self, log):
        self.__dict__["log"] = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name in ("label", "progress") and "text" in kwargs:
                self.log.append(kwargs["text"])
            if name == "prop" and len(args) >= 2:
                assert hasattr(args[0], args[1]), f"layout.prop on a missing property {args[1]!r}"
            return RecordingLayout(self.log)

        return call

    def __setattr__(self, name, value):
        pass


class Drawer:
    def __init__(self, wrapped, log):
        self.__dict__.update(wrapped=wrapped, layout=RecordingLayout(log))

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def test_panel_and_preferences_draw_what_the_artist_needs(addon, double, tmp_path):
    runtime, local = addon
    scene = fresh_scene()
    selected_statue(scene)
    log = []
    panel = sys.modules[f"{PACKAGE}.ui"].IM3D_PT_generate
    panel.draw(Drawer(None, log), bpy.context)
    assert "Prompt" in log and "Select one or more mesh objects" not in log
    # Mid-job: one bar with the stage in words, and the reason the buttons are off.
    scene.im3d.turntable_views = 6
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow = runtime.Jobs.active
    while not (flow.phase == "turntable" and flow.next_view >= 1):
        runtime.pump()
    log.clear()
    panel.draw(Drawer(None, log), bpy.context)
    assert any(text.startswith("Rendering the turntable (view 1 of 6)") for text in log), log
    assert "A job is running: wait for it or press Cancel" in log
    bpy.ops.im3d.cancel()
    runtime.pump()
    # Preferences: the download size before set-up, and errors in full.
    local.Backend.setup_error = "the packages could not be downloaded (dns error: failed to lookup address information); connect to the internet (or set HTTPS_PROXY) and press Set up Backend again"
    p = prefs()
    p.backend_mode = "LOCAL"
    log.clear()
    type(p).draw(Drawer(p, log), bpy.context)
    assert any(text.startswith("downloads about ") and "GB" in text for text in log), log
    assert "Set up Backend again" in " ".join(log) and all(len(text) <= 160 for text in log)
    local.Backend.setup_error = ""
