"""Operators of the sidebar: thin shells around `runtime.JobFlow`, the turntable and the importer.

Interactive (`invoke`): the flow runs from a timer (`runtime.pump`) — backend start and network in
worker threads, turntable views one per tick — and a modal handler only catches Esc. `execute()`
(scripts, `blender -b`, the bpy module) runs the flow to the end synchronously, unless
`asynchronous=True` (then the caller pumps `runtime.pump`, as tests and benches do).
"""

from __future__ import annotations

import math
import random

import bpy
from bpy.props import BoolProperty
from mathutils import Matrix

from . import local_backend, runtime
from .client import BackendError
from .importer import ImportFailed, object_name, place_beside
from .job_request import lpips_wanted, make_spec
from .jobs import check_spec
from .paths import preferences, turntable_folder
from .turntable import TurntableError, TurntableRender, orbit_views

REFINABLE = ("MESH", "CURVE", "SURFACE", "META", "FONT")


def _mesh_selection(context) -> list:
    selection = [obj for obj in context.selected_objects if obj.type in REFINABLE]
    active = context.active_object
    if active in selection:  # the active object first, the rest in name order
        selection.remove(active)
        return [active] + sorted(selection, key=lambda o: o.name)
    return sorted(selection, key=lambda o: o.name)


def _busy_poll(cls) -> bool:
    reason = runtime.busy_reason()
    if reason:
        cls.poll_message_set(reason)
        return False
    return True


class _JobOperator:
    asynchronous: BoolProperty(
        name="Asynchronous", description="Run the job from a timer and worker threads; the caller pumps runtime.pump (scripts, tests)",
        default=False, options={"HIDDEN", "SKIP_SAVE"},
    )

    _timer = None
    _flow = None

    def prepare(self, context) -> runtime.JobFlow:
        raise NotImplementedError

    def _fail(self, context, message: str) -> set:
        state = context.scene.im3d
        state.job_state, state.job_error = "failed", message
        self.report({"ERROR"}, message)
        return {"CANCELLED"}

    def _make_flow(self, context, targets: list) -> runtime.JobFlow:
        state = context.scene.im3d
        prefs = preferences()
        spec = make_spec(state, self.kind)
        check_spec(spec)  # the request's rules, once, before anything is rendered or sent
        key = f"{self.kind}-{spec.preset}-{'diffusion' if self.kind == 'generate' or state.refine_use_diffusion else 'nodiffusion'}"
        flow = runtime.JobFlow(scene_name=context.scene.name, spec=spec, targets=targets, speed_key=key)
        flow.preparation = local_backend.Preparation(prefs, spec.preset)
        flow.check_lpips = lpips_wanted(state)
        flow.uses_diffusion = self.kind == "generate" or state.refine_use_diffusion
        return flow

    def execute(self, context):
        if runtime.Jobs.active is not None:
            return self._fail(context, runtime.busy_reason())
        try:
            flow = self.prepare(context)
        except (BackendError, TurntableError) as error:
            return self._fail(context, getattr(error, "message", str(error)))
        if self.asynchronous:
            runtime.start_flow(flow)
            return {"FINISHED"}
        state = context.scene.im3d
        state.job_state, state.job_error, state.job_message = "running", "", ""
        try:
            names = flow.run_synchronously(local_backend.client(preferences()))
        except (BackendError, ImportFailed, TurntableError) as error:
            return self._fail(context, getattr(error, "message", str(error)))
        state.job_state, state.job_message, state.job_progress = "succeeded", "Imported " + ", ".join(names), 1.0
        self.report({"INFO"}, "IM-3D: imported " + ", ".join(names))
        return {"FINISHED"}

    # -- interactive
    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self.execute(context)
        if runtime.Jobs.active is not None:
            return self._fail(context, runtime.busy_reason())
        try:
            self._flow = self.prepare(context)
            runtime.start_flow(self._flow)
        except (BackendError, TurntableError) as error:
            return self._fail(context, getattr(error, "message", str(error)))
        self._timer = context.window_manager.event_timer_add(0.2, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS" and runtime.Jobs.active is self._flow:
            runtime.cancel_active()
            context.scene.im3d.job_message = "cancelling…"
            return {"RUNNING_MODAL"}
        if event.type == "TIMER" and runtime.Jobs.active is not self._flow:
            if self._flow.outcome == "failed":
                self.report({"ERROR"}, self._flow.error)
            return self._finish(context, {"FINISHED"})
        return {"PASS_THROUGH"}

    def cancel(self, context):  # Blender ends the modal operator (file load, quit): stop the job too
        if runtime.Jobs.active is self._flow:
            runtime.cancel_active()
        self._finish(context, {"CANCELLED"})

    def _finish(self, context, result: set) -> set:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        return result


class IM3D_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate a textured mesh from the prompt (and image) and put it at the 3D cursor"""

    bl_idname = "im3d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}
    kind = "generate"

    @classmethod
    def poll(cls, context):
        return _busy_poll(cls)

    def prepare(self, context) -> runtime.JobFlow:
        state = context.scene.im3d
        provenance = {"kind": "generate", "prompt": state.prompt, "seed": state.seed, "preset": state.preset.lower()}
        target = runtime.Target(
            kind="generate", name=object_name(state.prompt, "IM-3D image result"), provenance=provenance,
            location=tuple(context.scene.cursor.location),
        )
        return self._make_flow(context, [target])


class IM3D_OT_refine_selected(_JobOperator, bpy.types.Operator):
    """Render each selected object from a turntable, rebuild it with IM-3D and put the refined copy beside it"""

    bl_idname = "im3d.refine_selected"
    bl_label = "Refine Selected"
    bl_options = {"REGISTER"}
    kind = "refine"

    @classmethod
    def poll(cls, context):
        if not _busy_poll(cls):
            return False
        if not _mesh_selection(context):
            cls.poll_message_set("Select one or more mesh objects to refine")
            return False
        return True

    def prepare(self, context) -> runtime.JobFlow:
        state = context.scene.im3d
        selection = _mesh_selection(context)
        if not selection:
            raise BackendError("invalid_request", "select the object to refine first")
        if state.refine_use_diffusion and not state.prompt.strip():
            raise BackendError("invalid_request", "type a prompt describing the object, or switch 'Use Diffusion' off")
        views = orbit_views(state.turntable_views, math.degrees(state.turntable_elevation))
        targets = []
        for source in selection:
            views_dir = str(turntable_folder())
            turntable = TurntableRender(
                [source], views_dir, views, size=state.turntable_size, samples=state.turntable_samples, source_scene=context.scene,
            )
            provenance = {"kind": "refine", "prompt": state.prompt, "seed": state.seed, "preset": state.preset.lower(), "source": source.name}
            targets.append(runtime.Target(
                kind="refine", name=f"{source.name} refined", provenance=provenance, source_object=source.name,
                source_matrix=tuple(tuple(row) for row in source.matrix_world), source_width=max(source.dimensions.x, 0.1),
                hide_original=not state.keep_original, turntable=turntable, views_dir=views_dir,
            ))
        return self._make_flow(context, targets)


class IM3D_OT_cancel(bpy.types.Operator):
    """Cancel the running job: stops the turntable render or the backend's work; nothing is added to the scene"""

    bl_idname = "im3d.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        if not runtime.cancel_active():
            self.report({"WARNING"}, "no IM-3D job is running")
            return {"CANCELLED"}
        context.scene.im3d.job_message = "cancelling…"
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
    """Import the selected history entry again where it was made (its files are re-verified first)"""

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
                raise ImportFailed(f"{entry.folder} has no mesh.glb; re-run the job")
            frame, matrix = _matrix(entry.frame), _matrix(entry.matrix)
            existing = bpy.data.objects.get(entry.name)
            provenance = {"job_id": entry.job_id, "kind": entry.kind, "prompt": entry.prompt, "seed": entry.seed, "preset": entry.preset}
            if entry.source_object:
                provenance["source"] = entry.source_object
            obj = import_result(files["mesh.glb"], scene=scene, name=entry.name, provenance=provenance, frame=frame, matrix_world=matrix)
            if existing is not None and existing != obj:  # the first copy is still there: put this one beside it
                place_beside(obj, matrix, entry.width, scene)
        except (BackendError, ImportFailed) as error:
            self.report({"ERROR"}, getattr(error, "message", str(error)))
            return {"CANCELLED"}
        self.report({"INFO"}, f"IM-3D: re-imported {obj.name}")
        return {"FINISHED"}


def _matrix(values) -> Matrix:
    values = list(values)
    if len(values) != 16 or not any(values):
        return Matrix.Identity(4)  # an entry from before transforms were stored
    return Matrix([values[0:4], values[4:8], values[8:12], values[12:16]])


classes = (IM3D_OT_generate, IM3D_OT_refine_selected, IM3D_OT_cancel, IM3D_OT_randomize_seed, IM3D_OT_reimport)
