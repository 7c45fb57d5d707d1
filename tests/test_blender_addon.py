"""The built extension in real Blender (bpy module): install, enable, register, no leaks; client failure modes.

Runs without a backend: an unreachable URL, and a protocol double that serves a corrupt artifact
(to prove the add-on checks every download against the job's manifest).
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import socket
import sys
import threading

import pytest

from blender_session import ROOT, import_bpy
from im3d.testing.fake_http import JsonHandler

bpy = import_bpy()
import addon_utils  # noqa: E402

pytestmark = pytest.mark.blender
PACKAGE = "bl_ext.user_default.im3d_blender"


def load_build():
    spec = importlib.util.spec_from_file_location("im3d_build", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_extension(tmp_dir) -> None:
    """Build, validate and install the extension into this session's fresh user directory, enabled."""
    if PACKAGE in bpy.context.preferences.addons:
        return
    build = load_build()
    zip_path = build.build_zip(tmp_dir)
    build.validate(zip_path)
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}
    assert PACKAGE in bpy.context.preferences.addons


@pytest.fixture(scope="module")
def addon(tmp_path_factory):
    install_extension(tmp_path_factory.mktemp("dist"))
    return sys.modules[PACKAGE]


def addon_classes():
    modules = [sys.modules[f"{PACKAGE}.{name}"] for name in ("properties", "preferences", "operators", "ui")]
    return [cls for module in modules for cls in module.classes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_scene():
    bpy.ops.wm.read_homefile(use_factory_startup=True, use_empty=False)
    return bpy.context.scene


def test_installed_extension_registers_every_class(addon):
    assert addon.__file__.startswith(bpy.utils.user_resource("EXTENSIONS"))  # the installed copy, not the checkout
    classes = addon_classes()
    assert len(classes) >= 10
    assert all(cls.is_registered for cls in classes), [cls.__name__ for cls in classes if not cls.is_registered]
    for operator in ("generate", "refine_selected", "cancel", "randomize_seed", "reimport", "setup_backend", "backend_start"):
        assert hasattr(bpy.ops.im3d, operator)
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    assert (prefs.backend_mode, prefs.port) == ("LOCAL", 8765)
    assert fresh_scene().im3d.preset == "STANDARD"


def test_disable_enable_leaks_no_timers_or_handlers(addon):
    runtime = sys.modules[f"{PACKAGE}.runtime"]
    handlers_before = {name: len(getattr(bpy.app.handlers, name)) for name in dir(bpy.app.handlers) if not name.startswith("_") and isinstance(getattr(bpy.app.handlers, name), list)}
    for _ in range(3):
        addon_utils.disable(PACKAGE, default_set=True)
        assert not hasattr(bpy.types.Scene, "im3d")
        assert not hasattr(bpy.types, "IM3D_PT_generate")
        assert not bpy.app.timers.is_registered(runtime.pump)
        addon_utils.enable(PACKAGE, default_set=True)
        runtime = sys.modules[f"{PACKAGE}.runtime"]
    handlers_after = {name: len(getattr(bpy.app.handlers, name)) for name in handlers_before}
    assert handlers_after == handlers_before
    assert not bpy.app.timers.is_registered(runtime.pump)
    assert all(cls.is_registered for cls in addon_classes())


def test_unreachable_backend_fails_clearly_and_leaves_the_ui_usable(addon):
    scene = fresh_scene()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.url, prefs.token = "REMOTE", f"http://127.0.0.1:{free_port()}", "x" * 20
    scene.im3d.prompt = "a red teapot"
    objects_before = set(bpy.data.objects)
    try:
        with pytest.raises(RuntimeError, match="cannot reach the backend"):
            bpy.ops.im3d.generate()
    finally:
        prefs.backend_mode = "LOCAL"
    assert set(bpy.data.objects) == objects_before
    assert "cannot reach the backend" in scene.im3d.job_error and scene.im3d.job_state == "failed"
    runtime = sys.modules[f"{PACKAGE}.runtime"]
    assert runtime.Jobs.active is None
    seed = scene.im3d.seed
    assert bpy.ops.im3d.randomize_seed() == {"FINISHED"} and scene.im3d.seed != seed  # the panel still works


def test_generate_needs_a_prompt_or_image(addon):
    scene = fresh_scene()
    scene.im3d.prompt = "   "
    with pytest.raises(RuntimeError, match="type a prompt or choose an image"):
        bpy.ops.im3d.generate()


class _LyingBackend(JsonHandler):
    """Speaks protocol v1 but serves an artifact whose bytes differ from its manifest entry."""

    glb = b"glTF-not-really" * 10

    def _status(self):
        listed = hashlib.sha256(b"the bytes the backend meant to send").hexdigest()
        return {
            "id": "job1", "kind": "generate", "state": "succeeded", "stage": "done", "progress": 1.0, "message": "", "eta_s": None,
            "error": None, "previews": [], "artifacts": [{"name": "mesh.glb", "size": len(self.glb), "sha256": listed}],
        }

    def do_GET(self):
        if self.path == "/v1/health":
            self.send_json(200, {"version": "test", "protocol": 1, "device": "cpu", "models_loaded": [], "queue_length": 0, "running_job": None})
        elif self.path == "/v1/jobs/job1":
            self.send_json(200, self._status())
        elif self.path == "/v1/jobs/job1/artifacts/mesh.glb":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.glb)))
            self.end_headers()
            self.wfile.write(self.glb)
        else:
            self.send_json(404, {"error": {"code": "not_found", "message": "no such route"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_json(201, {"id": "job1"})


def test_corrupt_result_leaves_the_scene_unchanged(addon):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scene = fresh_scene()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.url, prefs.token = "REMOTE", f"http://127.0.0.1:{server.server_address[1]}", "x" * 20
    scene.im3d.prompt = "a red teapot"
    objects_before, meshes_before = set(bpy.data.objects), set(bpy.data.meshes)
    try:
        with pytest.raises(RuntimeError, match="does not match the sha256"):
            bpy.ops.im3d.generate()
    finally:
        prefs.backend_mode = "LOCAL"
        server.shutdown()
        server.server_close()
    assert set(bpy.data.objects) == objects_before and set(bpy.data.meshes) == meshes_before
    assert "IM-3D" not in bpy.data.collections
    assert "sha256" in scene.im3d.job_error
    assert len(scene.im3d_history) == 0
