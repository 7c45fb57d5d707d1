"""Operators of the sidebar: thin wrappers around runtime (jobs), turntable and importer.

Interactive (`invoke`): the job runs in a worker thread, a timer applies its events on the main
thread, a modal handler catches Esc. `execute()` (scripts, `blender -b`, the bpy module) runs the
job to the end synchronously, unless `asynchronous=True` (then the caller pumps `runtime.pump`).
"""

from __future__ import annotations

import random
import shutil

import bpy
from bpy.props import BoolProperty

from . import runtime
from .client import BackendError
from .importer import ImportFailed, object_name
from .jobs import JobRun
from .turntable import TurntableError, TurntableRender, orbit_views


def _mesh_selection(context) -> list:
    return [obj for obj in context.selected_objects if obj.type in ("MESH", "CURVE", "SURFACE", "META", "FONT")]


def _views_remover(views_dir):
    def remove(job, outcome):
        if views_dir:
            shutil.rmtree(views_dir, ignore_errors=True)

    return remove


class _JobOperator:
    asynchronous: BoolProperty(name="Asynchronous", description="Run the job in a worker thread (the caller pumps runtime.pump)", default=False, options={"HIDDEN", "SKIP_SAVE"})

    _timer = None
    _job = None
    _turntable = None
    _next_view = 0

    # -- what each operator prepares
    def prepare(self, context) -> runtime.ActiveJob:
        raise NotImplementedError

    def _fail(self, context, message: str) -> set:
        state = context.scene.im3d
        state.job_state, state.job_error = "failed", message
        self.report({"ERROR"}, message)
        return {"CANCELLED"}

    def _begin(self, context, views_dir: str | None) -> runtime.ActiveJob:
        prefs = runtime.preferences()
        state = context.scene.im3d
        client = runtime.client_for(prefs)
        spec = runtime.make_spec(state, self.kind, views_dir)
        run = JobRun(client, spec, runtime.results_dir())
        state.job_state, state.job_stage, state.job_error, state.job_message = "starting", "", "", ""
        state.job_progress, state.job_id, state.job_eta = 0.0, "", ""
        return run

    def execute(self, context):
        if runtime.Jobs.active is not None:
            return self._fail(context, "a job is already running; cancel it or wait for it to finish")
        try:
            job = self.prepare(context)
            if self.kind == "refine":
                with self._turntable as turntable:
                    turntable.render_all()
            job.run = self._begin(context, self._views_dir)
            if self.asynchronous:
                job.on_done = _views_remover(self._views_dir)
                runtime.start_job(job)
                return {"FINISHED"}
            result = job.run.run()
            obj = runtime.apply_result(job, result)
        except (BackendError, ImportFailed, TurntableError) as error:
            return self._fail(context, getattr(error, "message", str(error)))
        finally:
            if not self.asynchronous:
                self._discard_views()
        state = context.scene.im3d
        state.job_state, state.job_message = "succeeded", f"imported {obj.name}"
        runtime.undo_push(f"IM-3D: import {obj.name}")
        self.report({"INFO"}, f"IM-3D: imported {obj.name}")
        return {"FINISHED"}

    # -- interactive
    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self.execute(context)
        if runtime.Jobs.active is not None:
            return self._fail(context, "a job is already running; cancel it or wait for it to finish")
        try:
            self._job = self.prepare(context)
            if self.kind == "refine":
                self._turntable.setup()
                self._next_view = 0
            else:
                self._launch(context)
        except (BackendError, TurntableError) as error:
            self._cleanup_turntable()
            return self._fail(context, getattr(error, "message", str(error)))
        self._timer = context.window_manager.event_timer_add(0.05, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def _launch(self, context) -> None:
        self._job.run = self._begin(context, self._views_dir)
        self._job.on_done = _views_remover(self._views_dir)
        runtime.start_job(self._job)

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            if self._turntable is not None and self._turntable.scene is not None:
                self._cleanup_turntable()
                self._discard_views()
                context.scene.im3d.job_state = "cancelled"
                return self._finish(context, {"CANCELLED"})
            runtime.cancel_active()
            context.scene.im3d.job_message = "cancelling..."
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        if self._turntable is not None and self._turntable.scene is not None:
            # One view per tick: Blender redraws between renders and shows the progress.
            state = context.scene.im3d
            try:
                self._turntable.render_view(self._next_view)
                self._next_view += 1
                state.job_state, state.job_stage = "rendering", f"turntable {self._next_view}/{len(self._turntable)}"
                state.job_progress = 0.0
                if self._next_view == len(self._turntable):
                    self._turntable.write_transforms()
                    self._cleanup_turntable()
                    self._launch(context)
            except (BackendError, TurntableError) as error:
                self._cleanup_turntable()
                self._discard_views()
                self._fail(context, getattr(error, "message", str(error)))
                return self._finish(context, {"CANCELLED"})
            runtime.redraw()
            return {"RUNNING_MODAL"}
        if runtime.Jobs.active is None or runtime.Jobs.active is not self._job:
            return self._finish(context, {"FINISHED"})
        return {"PASS_THROUGH"}

    def cancel(self, context):  # Blender ends the modal operator (file load, quit): stop the job too
        runtime.cancel_active()
        self._cleanup_turntable()
        self._finish(context, {"CANCELLED"})

    def _finish(self, context, result: set) -> set:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        return result

    def _cleanup_turntable(self) -> None:
        if self._turntable is not None:
            self._turntable.cleanup()

    def _discard_views(self) -> None:
        views = getattr(self, "_views_dir", None)
        if views:
            shutil.rmtree(views, ignore_errors=True)


class IM3D_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate a textured mesh from the prompt (and image) and put it at the 3D cursor"""

    bl_idname = "im3d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}
    kind = "generate"
    _views_dir = None

    def prepare(self, context) -> runtime.ActiveJob:
        state = context.scene.im3d
        if not state.prompt.strip() and not state.image_path:
            raise BackendError("invalid_request", "type a prompt or choose an image first")
        provenance = {"kind": "generate", "prompt": state.prompt, "seed": state.seed, "preset": state.preset.lower()}
        return runtime.ActiveJob(
            run=None, kind="generate", name=object_name(state.prompt, "IM-3D image result"), provenance=provenance,
            scene_name=context.scene.name, location=tuple(context.scene.cursor.location),
        )


class IM3D_OT_refine_selected(_JobOperator, bpy.types.Operator):
    """Render the selected object from a turntable, rebuild it with IM-3D and put the refined copy beside it"""

    bl_idname = "im3d.refine_selected"
    bl_label = "Refine Selected"
    bl_options = {"REGISTER"}
    kind = "refine"
    _views_dir = None

    @classmethod
    def poll(cls, context):
        return bool(_mesh_selection(context))

    def prepare(self, context) -> runtime.ActiveJob:
        state = context.scene.im3d
        selection = _mesh_selection(context)
        if not selection:
            raise BackendError("invalid_request", "select the object to refine first")
        source = context.active_object if context.active_object in selection else selection[0]
        if state.refine_use_diffusion and not state.prompt.strip():
            raise BackendError("invalid_request", "type a prompt describing the object, or switch 'Use Diffusion' off")
        self._views_dir = str(runtime.turntable_folder())
        self._turntable = TurntableRender(
            [source], self._views_dir, orbit_views(state.turntable_views, state.turntable_elevation),
            size=state.turntable_size, samples=state.turntable_samples, source_scene=context.scene,
        )
        provenance = {"kind": "refine", "prompt": state.prompt, "seed": state.seed, "preset": state.preset.lower(), "source": source.name}
        return runtime.ActiveJob(
            run=None, kind="refine", name=f"{source.name} refined", provenance=provenance, scene_name=context.scene.name,
            location=tuple(source.matrix_world.translation), source_object=source.name, hide_original=not state.keep_original,
        )


class IM3D_OT_cancel(bpy.types.Operator):
    """Cancel the running job (here and on the backend)"""

    bl_idname = "im3d.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        if not runtime.cancel_active():
            self.report({"WARNING"}, "no IM-3D job is running")
            return {"CANCELLED"}
        context.scene.im3d.job_message = "cancelling..."
        return {"FINISHED"}


class IM3D_OT_randomize_seed(bpy.types.Operator):
    """Pick a new random seed"""

    bl_idname = "im3d.randomize_seed"
    bl_label = "Randomize Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        context.scene.im3d.seed = random.randrange(0, 2**31 - 1)
        return {"FINISHED"}


class IM3D_OT_reimport(bpy.types.Operator):
    """Import the selected history entry again (its files are re-verified first)"""

    bl_idname = "im3d.reimport"
    bl_label = "Re-import"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        from .client import verify_downloaded
        from .importer import import_result

        scene = context.scene
        if not 0 <= scene.im3d_history_index < len(scene.im3d_history):
            self.report({"ERROR"}, "choose a result in the history list first")
            return {"CANCELLED"}
        entry = scene.im3d_history[scene.im3d_history_index]
        try:
            files = verify_downloaded(entry.folder)
            if "mesh.glb" not in files:
                raise ImportFailed(f"{entry.folder} has no mesh.glb")
            provenance = {"job_id": entry.job_id, "kind": entry.kind, "prompt": entry.prompt, "seed": entry.seed, "preset": entry.preset}
            obj = import_result(files["mesh.glb"], scene=scene, name=entry.name.split(".")[0] or entry.name, provenance=provenance, location=scene.cursor.location.copy())
        except (BackendError, ImportFailed) as error:
            self.report({"ERROR"}, getattr(error, "message", str(error)))
            return {"CANCELLED"}
        self.report({"INFO"}, f"IM-3D: re-imported {obj.name}")
        return {"FINISHED"}


classes = (IM3D_OT_generate, IM3D_OT_refine_selected, IM3D_OT_cancel, IM3D_OT_randomize_seed, IM3D_OT_reimport)
