"""The running job: one flow from the click to the imported object(s), with one progress bar and one Cancel.

    preparing  (worker thread: start/adopt the backend, ask it for presets and models)
 → turntable   (Refine: one view per timer tick on the main thread, so Blender stays responsive)
 → running     (worker thread: upload, job, poll, verified download — `jobs.JobRun`)
 → import      (main thread) → the next selected object, or done

`pump()` (a `bpy.app.timers` callback) advances the active flow and is the only place events reach
bpy. `JobFlow.run_synchronously()` does the same steps in order for `execute()` in scripts,
`blender -b` and the bpy module. Module map: backend process and set-up in `local_backend.py`,
panel settings → request in `job_request.py`, stage words and ETA in `progress.py`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from mathutils import Matrix

from . import local_backend
from .client import BackendError
from .jobs import JobCancelled, JobResult, JobRun, JobSpec
from .paths import results_dir, user_dir
from .progress import PHASE_TEXT, EtaEstimator, SpeedMemory, format_eta, stage_text
from .turntable import TurntableCancelled, TurntableError, TurntableRender

LPIPS_MISSING = (
    "The fit's perceptual loss needs the LPIPS backbone (VGG16 weights), which is not downloaded yet. "
    "Download it in Edit → Preferences → Add-ons → IM-3D → Models (Download Models), or untick 'Perceptual Loss (LPIPS)' "
    "in the panel to fit without it (a little less detail)."
)


@dataclass
class Target:
    """One object the flow makes: a Generate result, or the refined copy of one selected object."""

    kind: str
    name: str
    provenance: dict
    location: tuple = (0.0, 0.0, 0.0)
    source_object: str | None = None
    source_matrix: tuple | None = None  # the original's world matrix when its turntable was rendered
    source_width: float = 1.0
    hide_original: bool = False
    turntable: TurntableRender | None = None
    views_dir: str | None = None


@dataclass
class JobFlow:
    scene_name: str
    spec: JobSpec  # the request template; each target gets its own views
    targets: list[Target]
    speed_key: str = ""
    phase: str = "preparing"  # preparing | turntable | running | done
    index: int = 0
    preparation: local_backend.Preparation | None = None
    run: JobRun | None = None
    next_view: int = 0
    outcome: str | None = None  # finished | failed | cancelled
    error: str = ""
    imported: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    target_started: float = field(default_factory=time.monotonic)
    view_seconds: list = field(default_factory=list)
    eta: EtaEstimator | None = None
    fraction: float = 0.0
    cancel_requested: bool = False
    check_lpips: bool = False
    uses_diffusion: bool = True

    # -- shared by both paths
    @property
    def target(self) -> Target:
        return self.targets[self.index]

    def scene(self):
        return bpy.data.scenes.get(self.scene_name) or bpy.context.scene

    def state(self):
        return self.scene().im3d

    def _check_models(self) -> None:
        """Before any turntable renders: a model this job needs that the backend says is missing."""
        if self.check_lpips and local_backend.Backend.lpips_missing:
            raise BackendError("model_not_found", LPIPS_MISSING)
        needed = []
        for name in local_backend.Backend.missing:
            if (name == "orbit-video" and self.uses_diffusion) or (name == "text-to-image" and self.spec.kind == "generate" and not self.spec.image_path):
                needed.append(name)
        if needed:
            fallback = " — or switch 'Use Diffusion' off to rebuild from the renders only" if self.spec.kind == "refine" else ""
            raise BackendError(
                "model_not_found", f"the backend has no {' and no '.join(needed)} model yet: download it in Edit → Preferences → Add-ons → IM-3D → Models (Download Models){fallback}",
            )

    def _job_run(self, prefs_client) -> JobRun:
        spec = dataclasses.replace(self.spec, views_dir=self.target.views_dir)
        return JobRun(prefs_client, spec, results_dir())

    def _import(self, result: JobResult):
        obj = apply_result(self, self.target, result)
        self.imported.append(obj.name)
        return obj

    def _discard(self, target: Target) -> None:
        if target.turntable is not None:
            target.turntable.cleanup()
        if target.views_dir:
            shutil.rmtree(target.views_dir, ignore_errors=True)

    def discard_all(self) -> None:
        for target in self.targets:
            self._discard(target)

    # -- synchronous (execute(): scripts, blender -b, the bpy module)
    def run_synchronously(self, client) -> list:
        try:
            self.preparation.run()
            if self.preparation.error is not None:
                raise self.preparation.error
            self._check_models()
            for self.index, target in enumerate(self.targets):
                if target.turntable is not None:
                    self._capture_source(target)
                    with target.turntable as turntable:
                        turntable.render_all()
                self.run = self._job_run(client)
                try:
                    result = self.run.run()
                except BackendError as error:
                    raise translate_error(error) from None
                finally:
                    if target.views_dir:
                        shutil.rmtree(target.views_dir, ignore_errors=True)
                self._import(result)
        finally:
            self.discard_all()
        return self.imported

    # -- interactive: one step per timer tick
    def cancel(self) -> None:
        self.cancel_requested = True
        if self.preparation is not None:
            self.preparation.cancel()
        if self.run is not None:
            self.run.cancel()

    def step(self, client_factory) -> bool:
        """Advance the flow a little; True when it has ended (see `outcome`)."""
        state = self.state()
        try:
            if self.phase == "preparing":
                if self.cancel_requested:
                    return self._end("cancelled", "cancelled before the job started")
                if not self.preparation.done:
                    self._show(PHASE_TEXT["starting" if self.preparation.stage == "starting" else "checking"])
                    return False
                if self.preparation.error is not None:
                    raise self.preparation.error
                self._check_models()
                self._begin_target(client_factory)
                return False
            if self.phase == "turntable":
                turntable = self.target.turntable
                if self.cancel_requested:
                    return self._end("cancelled", "cancelled while rendering the turntable")
                if bpy.data.objects.get(self.target.source_object or "") is None:
                    raise TurntableError(f"the object {self.target.source_object!r} was deleted while its turntable rendered; nothing was sent")
                started = time.perf_counter()
                turntable.render_view(self.next_view)
                self.view_seconds.append(time.perf_counter() - started)
                self.next_view += 1
                self._show(f"{PHASE_TEXT['turntable']} (view {self.next_view} of {len(turntable)})")
                if self.next_view == len(turntable):
                    turntable.write_transforms()
                    turntable.cleanup()
                    local_backend_memory().remember_seconds(self._view_key(), sum(self.view_seconds) / len(self.view_seconds))
                    self._launch(client_factory)
                return False
            if self.phase == "running":
                return self._drain()
        except (BackendError, TurntableError) as error:
            if isinstance(error, (JobCancelled, TurntableCancelled)):
                return self._end("cancelled", error.message if hasattr(error, "message") else str(error))
            error = translate_error(error) if isinstance(error, BackendError) else error
            return self._end("failed", getattr(error, "message", str(error)))
        except Exception as error:  # noqa: BLE001 - e.g. the object deleted mid-turntable: end the job, never leave it stuck
            return self._end("failed", f"the job stopped unexpectedly ({error!r}); nothing was added to the scene")
        return self.phase == "done"

    def _capture_source(self, target: Target) -> None:
        """The original as it is when its turntable renders (the artist may have moved it since the click)."""
        source = bpy.data.objects.get(target.source_object or "")
        if source is None:
            raise TurntableError(f"the object {target.source_object!r} was deleted before it could be rendered; nothing was sent")
        target.source_matrix = tuple(tuple(row) for row in source.matrix_world)
        target.source_width = max(source.dimensions.x, 0.1)

    def _begin_target(self, client_factory) -> None:
        self.target_started = time.monotonic()
        self.eta = EtaEstimator(local_backend_memory().timeline(self.speed_key))
        if self.target.turntable is not None:
            self._capture_source(self.target)
            self.target.turntable.setup()
            self.next_view = 0
            self.phase = "turntable"
            self._show(PHASE_TEXT["turntable"])
        else:
            self._launch(client_factory)

    def _launch(self, client_factory) -> None:
        self.run = self._job_run(client_factory())
        self.run.start()
        self.phase = "running"
        self._show(stage_text("upload"))

    def _drain(self) -> bool:
        state = self.state()
        finished = None
        while True:
            try:
                kind, payload = self.run.events.get_nowait()
            except Exception:
                break
            if kind == "status":
                self._status(payload)
            elif kind == "preview":
                load_preview(state, payload)
            elif kind == "finished":
                finished = payload
            elif kind == "cancelled":
                return self._end("cancelled", payload.message)
            elif kind == "failed":
                return self._end("failed", translate_error(payload).message)
        if finished is None:
            self._show(None)
            return False
        if self.target.views_dir:
            shutil.rmtree(self.target.views_dir, ignore_errors=True)
        local_backend_memory().remember_timeline(self.speed_key, self.eta.timeline() if self.eta else [])
        try:
            self._import(finished)
        except Exception as error:  # ImportFailed, BackendError: the scene is unchanged
            return self._end("failed", getattr(error, "message", str(error)))
        if self.index + 1 < len(self.targets):
            self.index += 1
            self.phase = "preparing_next"
            self._begin_target(client_factory=lambda: self.run.client)
            return False
        return self._end("finished", "")

    # -- what the panel shows
    def _status(self, status: dict) -> None:
        stage = str(status.get("stage") or "")
        if status.get("state") == "running" and self.eta is not None:
            self.eta.update(time.monotonic(), stage, float(status.get("progress") or 0.0))
        if status.get("state") == "queued":
            stage = "queued"
        self.backend_stage, self.backend_message = stage, str(status.get("message") or "")
        self.state().job_id = str(status.get("id") or self.state().job_id)
        self.backend_progress = max(0.0, min(1.0, float(status.get("progress") or 0.0)))

    def _show(self, text: str | None) -> None:
        state = self.state()
        now = time.monotonic()
        if text is None:  # the backend's own stage
            text = stage_text(getattr(self, "backend_stage", "upload"))
            detail = re.search(r"step (\d+)/(\d+)", getattr(self, "backend_message", ""))
            if detail:
                text += f" (step {detail.group(1)} of {detail.group(2)})"
        if len(self.targets) > 1:
            text = f"{self.targets[self.index].source_object or ''} ({self.index + 1} of {len(self.targets)}): {text}"
        remaining = self._remaining(now)
        elapsed = now - self.target_started
        later = len(self.targets) - self.index - 1
        total_remaining = None if remaining is None else remaining + later * (elapsed + remaining)  # the next objects take as long
        state.job_state = "running"
        state.job_stage = text
        state.job_eta = format_eta(total_remaining)
        # The bar: share of the estimated time when there is an estimate, else the steps done; never back.
        if remaining is not None:
            own = elapsed / (elapsed + remaining) if elapsed + remaining > 0 else 0.0
        elif self.phase == "turntable":
            own = 0.2 * self.next_view / max(1, len(self.target.turntable))
        elif self.phase == "running":
            own = (0.2 if self.target.turntable is not None else 0.0) + 0.8 * getattr(self, "backend_progress", 0.0)
        else:
            own = 0.0
        if self.phase == "preparing":
            own = 0.0
        self.fraction = max(self.fraction, (self.index + min(own, 0.99)) / len(self.targets))
        state.job_progress = self.fraction

    def _view_key(self) -> str:
        turntable = self.target.turntable
        return f"turntable-view-{turntable.size}px-{turntable.samples}spp" if turntable else ""

    def _remaining(self, now: float) -> float | None:
        memory = local_backend_memory()
        backend = None
        if self.phase == "running" and self.eta is not None:
            backend = self.eta.remaining(now)
        elif self.phase in ("turntable", "preparing") or self.eta is None:
            timeline = memory.timeline(self.speed_key)
            backend = EtaEstimator(timeline).remaining(now) if timeline else None
        if backend is None:
            return None
        turntable = 0.0
        if self.phase in ("preparing", "turntable") and self.target.turntable is not None:
            per_view = (sum(self.view_seconds) / len(self.view_seconds)) if self.view_seconds else memory.seconds(self._view_key())
            if per_view is None:
                return None
            turntable = per_view * (len(self.target.turntable) - self.next_view)
        return backend + turntable

    def _end(self, outcome: str, message: str) -> bool:
        self.phase, self.outcome = "done", outcome
        if self.run is not None and outcome != "finished":
            self.run.cancel()
        self.discard_all()
        state = self.state()
        if outcome == "finished":
            state.job_state, state.job_error = "succeeded", ""
            state.job_message = "Imported " + ", ".join(self.imported)
            state.job_progress, state.job_eta = 1.0, ""
        elif outcome == "cancelled":
            state.job_state, state.job_error = "cancelled", ""
            done = f"; kept {', '.join(self.imported)}" if self.imported else "; nothing was added to the scene"
            state.job_message = (message or "cancelled") + done
        else:
            state.job_state, state.job_error = "failed", message
            self.error = message
        return True


def translate_error(error: BackendError) -> BackendError:
    """Errors in words that point at a control in Blender, not at a config key."""
    local_backend.note_model_error(error)
    if error.code == "model_not_found" and "lpips" in error.message.lower():
        return BackendError("model_not_found", LPIPS_MISSING)
    return error


_memory: SpeedMemory | None = None


def local_backend_memory() -> SpeedMemory:
    global _memory
    if _memory is None:
        try:
            _memory = SpeedMemory(user_dir() / "speeds.json")
        except (OSError, ValueError, RuntimeError):
            _memory = SpeedMemory(None)
    return _memory


class Jobs:
    active: JobFlow | None = None
    longest_pump_s: float = 0.0


def busy_reason() -> str:
    """Why the job buttons are greyed out now ("" when they are not)."""
    if Jobs.active is not None:
        return "A job is running: wait for it or press Cancel"
    if local_backend.setup_running():
        return "The backend is being set up (see Preferences)"
    return ""


def redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def set_status_bar(text: str | None) -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        try:
            window.workspace.status_text_set(text)
        except (AttributeError, RuntimeError, TypeError):
            pass


def apply_result(flow: JobFlow, target: Target, result: JobResult):
    """Import a verified result (main thread) and record it in the history; returns the new object."""
    from .importer import import_result, place_beside

    scene = flow.scene()
    provenance = dict(target.provenance, job_id=result.job_id)
    if target.kind == "refine":
        frame = Matrix(target.source_matrix)
        obj = import_result(result.files["mesh.glb"], scene=scene, name=target.name, provenance=provenance, frame=frame)
        original = bpy.data.objects.get(target.source_object) if target.source_object else None
        if original is not None:
            place_beside(obj, frame, target.source_width, scene)
            if target.hide_original:
                original.hide_set(True)
                original.hide_render = True
        # else: the original was deleted while the job ran; the copy takes its place.
    else:
        frame = Matrix.Identity(4)
        obj = import_result(result.files["mesh.glb"], scene=scene, name=target.name, provenance=provenance, location=target.location)
    entry = scene.im3d_history.add()
    entry.job_id, entry.kind, entry.name = result.job_id, target.kind, obj.name
    entry.prompt, entry.seed, entry.preset = provenance.get("prompt", ""), int(provenance.get("seed", 0)), provenance.get("preset", "")
    entry.folder = str(result.folder)
    entry.source_object = target.source_object or ""
    entry.frame = [x for row in frame for x in row]
    entry.matrix = [x for row in obj.matrix_world for x in row]
    entry.width = target.source_width if target.kind == "refine" else max(obj.dimensions.x, 0.1)
    scene.im3d_history_index = len(scene.im3d_history) - 1
    undo_push(f"IM-3D: import {obj.name}")
    return obj


def pump() -> float | None:
    """Advance the running job; the bpy.app.timers callback (returns the next interval)."""
    start = time.perf_counter()
    try:
        return _pump()
    finally:
        Jobs.longest_pump_s = max(Jobs.longest_pump_s, time.perf_counter() - start)


def _pump() -> float | None:
    flow = Jobs.active
    if flow is None:
        redraw()
        return 0.5 if local_backend.busy_in_background() else None
    from .paths import preferences

    def client_factory():
        return local_backend.client(preferences())

    done = flow.step(client_factory)
    state = flow.state()
    if not done:
        set_status_bar(f"IM-3D: {state.job_stage}  {state.job_progress:.0%}  {state.job_eta}")
        redraw()
        return 0.01 if flow.phase == "turntable" else 0.1
    Jobs.active = None
    set_status_bar(f"IM-3D failed: {state.job_error}" if flow.outcome == "failed" else None)
    redraw()
    return None


def undo_push(message: str) -> None:
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError:
        pass  # no undo stack without a window (background mode)


def load_preview(state, path: Path) -> None:
    name = "IM-3D preview"
    image = bpy.data.images.get(name)
    try:
        if image is None:
            image = bpy.data.images.load(str(path), check_existing=False)
            image.name = name
        else:
            image.filepath = str(path)
            image.reload()
        image.preview_ensure()
        state.preview_image = image
    except RuntimeError:
        pass  # a half-written preview: the next one will do


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=0.05, persistent=False)


def start_flow(flow: JobFlow) -> None:
    if Jobs.active is not None:
        raise BackendError("busy", "a job is already running; cancel it or wait for it to finish")
    Jobs.active = flow
    flow.preparation.start()
    state = flow.state()
    state.job_state, state.job_stage, state.job_error, state.job_message = "running", PHASE_TEXT["checking"], "", ""
    state.job_progress, state.job_id, state.job_eta = 0.0, "", ""
    ensure_timer()


def cancel_active() -> bool:
    if Jobs.active is None:
        return False
    Jobs.active.cancel()
    return True


def shutdown() -> None:
    """On disable: stop the job's work, timers and the local backend; leave no temporary scene."""
    flow = Jobs.active
    if flow is not None:
        flow.cancel()
        try:
            flow.discard_all()
        except (ReferenceError, RuntimeError):
            pass
        Jobs.active = None
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)
    local_backend.Backend.setup_cancel.set()
    local_backend.stop_backend()
