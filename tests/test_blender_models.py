"""Preferences → Models in real bpy, against a real backend process whose models are missing and a
local server speaking the Hub's file API: the list, Download Models with progress, a gated model
refused without the token and fetched with it, and the token kept out of .blend files."""

from __future__ import annotations

import sys

import pytest

from blender_session import import_bpy
from hub_server import HubServer, HubState, Repo, tiny_diffusers_repo
from test_blender_addon import PACKAGE, free_port, install_extension

bpy = import_bpy()

pytestmark = pytest.mark.blender

VGG_BYTES = 553_433_881  # torchvision's vgg16-397923af.pth


class RecordingLayout:
    """Stands in for a UILayout: records what the preferences draw."""

    def __init__(self, log: list):
        self.log = log
        self.enabled = True
        self.alert = False

    def row(self, **kwargs):
        return RecordingLayout(self.log)

    def box(self):
        return RecordingLayout(self.log)

    def label(self, text="", icon="NONE"):
        self.log.append(("label", text, icon))

    def prop(self, data, name, **kwargs):
        self.log.append(("prop", name, ""))

    def operator(self, idname, text="", icon="NONE"):
        self.log.append(("operator", idname, text))
        return type("Op", (), {})()

    def progress(self, factor=0.0, type="BAR", text=""):
        self.log.append(("progress", text, factor))


def drawn(models_ui, prefs) -> list:
    log: list = []
    models_ui.draw(prefs, bpy.context, RecordingLayout(log))
    return log


def test_models_preferences_list_missing_models_and_download_them_with_progress(tmp_path_factory, tmp_path):
    install_extension(tmp_path_factory.mktemp("dist"))
    local = sys.modules[f"{PACKAGE}.local_backend"]
    models_ui = sys.modules[f"{PACKAGE}.models_ui"]
    local.stop_backend()
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.backend_mode, prefs.python_path, prefs.port, prefs.device, prefs.auto_start = "LOCAL", sys.executable, free_port(), "cpu", True
    prefs.text_to_image_model, prefs.orbit_model, prefs.models_dir = "test/tiny", "test/gated", ""
    # the rows follow the scene's preset (standard: LPIPS-VGG); earlier tests in this bpy session may change it
    bpy.context.scene.im3d.preset = "STANDARD"
    # LPIPS-VGG is there (a file of torchvision's size); the two diffusion models are not
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with open(checkpoints / "vgg16-397923af.pth", "wb") as f:
        f.truncate(VGG_BYTES)  # sparse: costs no disk
    state = HubState(repos={"test/tiny": Repo(tiny_diffusers_repo(300_000)), "test/gated": Repo(tiny_diffusers_repo(300_000), gated=True)})
    state.slow = 0.02
    with HubServer(state) as hub:
        process = local.local_process(prefs)
        process.extra_env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
                             "IM3D_MODELS_DIR": str(tmp_path / "models"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        try:
            assert bpy.ops.im3d.models_refresh() == {"FINISHED"}, models_ui.Models.error
            rows = {r["name"]: r for r in models_ui.model_rows(models_ui.Models.listing)}
            assert list(rows) == ["text-to-image", "orbit-video", "lpips-vgg"]
            assert [rows[n]["status"] for n in rows] == ["missing", "missing", "present"]
            assert local.Backend.missing == ["text-to-image", "orbit-video"]  # what the job panel checks
            log = drawn(models_ui, prefs)
            labels = [entry[1] for entry in log if entry[0] == "label"]
            assert "text-to-image" in labels and "missing" in labels and "present" in labels
            assert ("operator", "im3d.models_download", "") in log and ("prop", "hf_token", "") in log

            # without the token: the open model is fetched, the gated one refused with its licence page
            prefs.hf_token = ""
            with pytest.raises(RuntimeError, match="gated"):  # the operator reports the error
                bpy.ops.im3d.models_download()
            assert "https://huggingface.co/test/gated" in models_ui.Models.error and "accept its licence" in models_ui.Models.error
            rows = {r["name"]: r for r in models_ui.model_rows(models_ui.Models.listing)}
            assert rows["text-to-image"]["present"] and not rows["orbit-video"]["present"]
            error_lines = [e[1] for e in drawn(models_ui, prefs) if e[0] == "label" and e[2] == "ERROR"]
            assert error_lines, "the failure is shown in the preferences"

            # with the token of the account that accepted the licence: everything present
            prefs.hf_token = state.token
            assert bpy.ops.im3d.models_download() == {"FINISHED"}, models_ui.Models.error
            seen = models_ui.Models.progress_seen
            assert seen[-1] == 1.0 and seen == sorted(seen) and any(0 < f < 1 for f in seen), seen
            assert all(r["present"] for r in models_ui.model_rows(models_ui.Models.listing))
            assert local.Backend.missing == []
            assert any(e[1] == "All models downloaded." for e in drawn(models_ui, prefs))
            assert any(r["token"] == state.token for r in state.requests)  # the backend used it for the pull
        finally:
            local.stop_backend()
    # the token is an add-on preference: not in a saved .blend, not in the backend's files
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    assert state.token.encode() not in blend.read_bytes()
    leaked = [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and state.token.encode() in p.read_bytes()]
    assert leaked == []
    prefs.hf_token = ""
