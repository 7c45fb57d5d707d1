"""Add-on preferences: where the backend runs, its environment, its process."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import runtime
from .client import BackendError


class IM3D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_mode: EnumProperty(
        name="Backend",
        items=[
            ("LOCAL", "Local", "Start a backend on this computer automatically"),
            ("REMOTE", "Remote URL", "Connect to a running backend, e.g. a studio GPU machine"),
        ],
        default="LOCAL",
    )
    url: StringProperty(name="URL", default="http://127.0.0.1:8765")
    token: StringProperty(name="Token", subtype="PASSWORD", description="The remote backend's bearer token")
    env_dir: StringProperty(name="Environment", subtype="DIR_PATH", description="Folder of the backend's Python environment (empty: inside Blender's extension user folder)")
    python_path: StringProperty(name="Python", subtype="FILE_PATH", description="Use this existing Python (with the im3d backend installed) instead of the set-up environment")
    port: IntProperty(name="Port", default=8765, min=1024, max=65535)
    device: EnumProperty(
        name="Device",
        items=[("auto", "Auto", "CUDA, else Apple MPS, else CPU"), ("cuda", "CUDA", ""), ("mps", "Apple MPS", ""), ("cpu", "CPU", "Slow")],
        default="auto",
    )
    text_to_image_model: StringProperty(name="Text-to-Image Model", description="Hugging Face id or local folder (empty: the backend's default)")
    orbit_model: StringProperty(name="Orbit Model", description="Hugging Face id or local folder (empty: the backend's default)")
    models_dir: StringProperty(name="Models Folder", subtype="DIR_PATH", description="Searched for models before the Hugging Face cache")
    low_vram: BoolProperty(name="Low VRAM", description="Keep model parts on the CPU until they run (slower, fits 8 GB GPUs)")
    auto_start: BoolProperty(name="Start Automatically", default=True, description="Start the local backend when a job needs it")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        if self.backend_mode == "REMOTE":
            layout.prop(self, "url")
            layout.prop(self, "token")
        else:
            box = layout.box()
            box.label(text="Environment", icon="CONSOLE")
            box.prop(self, "env_dir")
            box.prop(self, "python_path")
            row = box.row()
            setting_up = runtime.Backend.setup_thread is not None and runtime.Backend.setup_thread.is_alive()
            row.enabled = not setting_up
            row.operator("im3d.setup_backend", icon="IMPORT")
            if setting_up:
                box.label(text="Setting up the backend...", icon="TIME")
            if runtime.Backend.setup_error:
                box.label(text=runtime.Backend.setup_error, icon="ERROR")
            for line in list(runtime.Backend.setup_log)[-8:]:
                box.label(text=line[:160])

            box = layout.box()
            box.label(text="Process", icon="PLAY")
            box.prop(self, "port")
            box.prop(self, "device")
            box.prop(self, "low_vram")
            box.prop(self, "auto_start")
            process = runtime.Backend.process
            box.label(text=f"Status: {process.status_text() if process else 'stopped'}")
            row = box.row(align=True)
            row.operator("im3d.backend_start", icon="PLAY")
            row.operator("im3d.backend_stop", icon="PAUSE")
            row.operator("im3d.backend_restart", icon="FILE_REFRESH")
            if process is not None:
                for line in process.last_log_lines(8):
                    box.label(text=line[:160])
        box = layout.box()
        box.label(text="Models", icon="FILE_3D")
        box.prop(self, "text_to_image_model")
        box.prop(self, "orbit_model")
        box.prop(self, "models_dir")


class IM3D_OT_setup_backend(bpy.types.Operator):
    """Create the backend's Python environment from the lock file bundled with the extension (uses uv)"""

    bl_idname = "im3d.setup_backend"
    bl_label = "Set up Backend"

    def execute(self, context):
        prefs = runtime.preferences()
        runtime.start_setup(prefs, synchronous=bpy.app.background)
        if bpy.app.background and runtime.Backend.setup_error:
            self.report({"ERROR"}, runtime.Backend.setup_error)
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_backend_start(bpy.types.Operator):
    """Start the local backend"""

    bl_idname = "im3d.backend_start"
    bl_label = "Start"

    def execute(self, context):
        prefs = runtime.preferences()
        try:
            process = runtime.local_process(prefs)
            process.start()
            process.wait_ready(90.0)
        except BackendError as error:
            self.report({"ERROR"}, error.message)
            return {"CANCELLED"}
        self.report({"INFO"}, f"IM-3D backend running at {process.url}")
        return {"FINISHED"}


class IM3D_OT_backend_stop(bpy.types.Operator):
    """Stop the local backend"""

    bl_idname = "im3d.backend_stop"
    bl_label = "Stop"

    def execute(self, context):
        runtime.stop_backend()
        return {"FINISHED"}


class IM3D_OT_backend_restart(bpy.types.Operator):
    """Restart the local backend (applies changed settings)"""

    bl_idname = "im3d.backend_restart"
    bl_label = "Restart"

    def execute(self, context):
        runtime.stop_backend()
        return bpy.ops.im3d.backend_start()


classes = (IM3D_AddonPreferences, IM3D_OT_setup_backend, IM3D_OT_backend_start, IM3D_OT_backend_stop, IM3D_OT_backend_restart)
