"""Add-on preferences: where the backend runs, its environment (set-up with progress and Cancel), its process."""

from __future__ import annotations

import textwrap

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import local_backend, runtime
from .client import BackendError
from .local_backend import Backend
from .paths import preferences


def models_ui():
    """The Models section (im3d_blender/models_ui.py) when this version of the add-on has it."""
    try:
        from . import models_ui as module
    except ImportError:
        return None
    return module


def draw_wrapped(layout, text: str, icon: str = "NONE", width: int = 70) -> None:
    """Long messages on several lines (a label clips at the panel's edge); the first line carries the icon."""
    for index, line in enumerate(textwrap.wrap(text, width) or [""]):
        row = layout.row()
        row.alert = icon == "ERROR"
        row.label(text=line, icon=icon if index == 0 else "BLANK1")


class IM3D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_mode: EnumProperty(
        name="Backend", description="Where the heavy work runs",
        items=[
            ("LOCAL", "Local", "Start a backend on this computer automatically"),
            ("REMOTE", "Remote URL", "Connect to a running backend, e.g. a studio GPU machine"),
        ],
        default="LOCAL",
    )
    url: StringProperty(name="URL", description="Address of the remote backend, e.g. http://gpu-box:8765", default="http://127.0.0.1:8765")
    token: StringProperty(name="Token", subtype="PASSWORD", description="The remote backend's bearer token (from its token file)")
    hf_token: StringProperty(
        name="Hugging Face Token", subtype="PASSWORD",
        description="Access token of the Hugging Face account that accepted a gated model's licence (e.g. SV3D); sent only with Download Models, kept in Blender's preferences, never in .blend files",
    )
    env_dir: StringProperty(
        name="Environment", subtype="DIR_PATH",
        description="Folder of the backend's Python environment, made by Set up Backend (empty: inside Blender's extension user folder)",
    )
    python_path: StringProperty(
        name="Python", subtype="FILE_PATH", description="Use this existing Python (with the im3d backend installed) instead of the set-up environment",
    )
    port: IntProperty(name="Port", description="TCP port of the local backend on 127.0.0.1 (change it when another program uses it)", default=8765, min=1024, max=65535)
    device: EnumProperty(
        name="Device", description="Where the backend computes (applies after Restart)",
        items=[("auto", "Auto", "CUDA, else Apple MPS, else CPU"), ("cuda", "CUDA", "An NVIDIA GPU"), ("mps", "Apple MPS", "An Apple silicon GPU"), ("cpu", "CPU", "No GPU: slow")],
        default="auto",
    )
    text_to_image_model: StringProperty(name="Text-to-Image Model", description="Hugging Face id or local folder of the text-to-image model (empty: the backend's default)")
    orbit_model: StringProperty(name="Orbit Model", description="Hugging Face id or local folder of the orbit-video model (empty: the backend's default)")
    models_dir: StringProperty(name="Models Folder", subtype="DIR_PATH", description="Folder searched for models before the Hugging Face cache")
    low_vram: BoolProperty(name="Low VRAM", description="Keep model parts on the CPU until they run (slower, fits 8 GB GPUs)")
    auto_start: BoolProperty(name="Start Automatically", default=True, description="Start the local backend when a job needs it")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        if self.backend_mode == "REMOTE":
            layout.prop(self, "url")
            layout.prop(self, "token")
        else:
            self._draw_environment(layout.box())
            self._draw_process(layout.box())
        module = models_ui()
        if module is not None and hasattr(module, "draw"):
            module.draw(self, context, layout.box())
        else:
            box = layout.box()
            box.label(text="Models", icon="FILE_3D")
            box.prop(self, "text_to_image_model")
            box.prop(self, "orbit_model")
            box.prop(self, "models_dir")

    def _draw_environment(self, box) -> None:
        box.label(text="Environment", icon="CONSOLE")
        box.prop(self, "env_dir")
        box.prop(self, "python_path")
        setting_up = local_backend.setup_running()
        if setting_up:
            box.progress(factor=Backend.setup_progress, type="BAR", text=Backend.setup_stage or "setting up…")
            box.operator("im3d.setup_cancel", icon="CANCEL")
        else:
            row = box.row()
            row.enabled = runtime.Jobs.active is None
            row.operator("im3d.setup_backend", icon="IMPORT")
            row.label(text=f"downloads {local_backend.download_estimate()}")
            if Backend.setup_error:
                draw_wrapped(box, Backend.setup_error, "ERROR")
            elif Backend.setup_stage:
                draw_wrapped(box, Backend.setup_stage, "CHECKMARK" if Backend.setup_stage.startswith("done") else "INFO")
        lines = list(Backend.setup_log)[-6:]
        if lines:
            column = box.column(align=True)
            for line in lines:
                column.label(text=line[:150])

    def _draw_process(self, box) -> None:
        box.label(text="Process", icon="PLAY")
        box.prop(self, "port")
        box.prop(self, "device")
        box.prop(self, "low_vram")
        box.prop(self, "auto_start")
        process = Backend.process
        status = process.status_text() if process else "stopped"
        draw_wrapped(box, f"Status: {status}", "ERROR" if process is not None and process.last_error else "NONE")
        row = box.row(align=True)
        row.operator("im3d.backend_start", icon="PLAY")
        row.operator("im3d.backend_stop", icon="PAUSE")
        row.operator("im3d.backend_restart", icon="FILE_REFRESH")
        if process is not None:
            column = box.column(align=True)
            for line in process.last_log_lines(6):
                column.label(text=line[:150])


class IM3D_OT_setup_backend(bpy.types.Operator):
    """Create the backend's Python environment from the lock file bundled with the extension (uses uv; downloads about 2-3 GB the first time)"""

    bl_idname = "im3d.setup_backend"
    bl_label = "Set up Backend"

    def invoke(self, context, event):
        # Say how much will be downloaded before anything starts.
        message = f"Set up the backend: downloads {local_backend.download_estimate()} from PyPI (less if cached) into the Environment folder."
        return context.window_manager.invoke_confirm(self, event, title="Set up Backend", message=message, confirm_text="Download and Set Up")

    def execute(self, context):
        try:
            local_backend.start_setup(preferences(), synchronous=bpy.app.background, on_idle=runtime.ensure_timer)
        except BackendError as error:
            self.report({"ERROR"}, error.message)
            return {"CANCELLED"}
        if bpy.app.background and Backend.setup_error:
            self.report({"ERROR"}, Backend.setup_error)
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_setup_cancel(bpy.types.Operator):
    """Stop setting up the backend (the unfinished environment is removed)"""

    bl_idname = "im3d.setup_cancel"
    bl_label = "Cancel Set-up"

    def execute(self, context):
        if not local_backend.cancel_setup():
            self.report({"WARNING"}, "the backend is not being set up")
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_backend_start(bpy.types.Operator):
    """Start the local backend (in the background: the status below says when it is ready)"""

    bl_idname = "im3d.backend_start"
    bl_label = "Start"

    def execute(self, context):
        try:
            preparation = local_backend.Preparation(preferences())
            if preparation.remote:
                raise BackendError("remote_backend", "the backend is a remote URL: start it on that machine")
            preparation.auto_start = True
            if bpy.app.background:  # scripts and tests: wait here, there is no UI to keep alive
                preparation.run()
                if preparation.error is not None:
                    raise preparation.error
                self.report({"INFO"}, f"IM-3D backend running at {preparation.process.url}")
            else:
                local_backend.start_in_background(preparation)
                runtime.ensure_timer()
        except BackendError as error:
            self.report({"ERROR"}, error.message)
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_backend_stop(bpy.types.Operator):
    """Stop the local backend (a running job is cancelled)"""

    bl_idname = "im3d.backend_stop"
    bl_label = "Stop"

    def execute(self, context):
        runtime.cancel_active()
        local_backend.stop_backend()
        return {"FINISHED"}


class IM3D_OT_backend_restart(bpy.types.Operator):
    """Restart the local backend (applies changed settings)"""

    bl_idname = "im3d.backend_restart"
    bl_label = "Restart"

    def execute(self, context):
        runtime.cancel_active()
        local_backend.stop_backend()
        return bpy.ops.im3d.backend_start()


classes = (IM3D_AddonPreferences, IM3D_OT_setup_backend, IM3D_OT_setup_cancel, IM3D_OT_backend_start, IM3D_OT_backend_stop, IM3D_OT_backend_restart)
