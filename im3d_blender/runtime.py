"""State that lives as long as the add-on is enabled: the local backend process, the running job,
the set-up log. bpy is touched only from the main thread (`pump`, called by a timer or a modal operator)."""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bpy

from .backend_process import BackendProcess, env_python, setup_environment
from .client import BackendClient, BackendError, format_eta
from .jobs import JobResult, JobRun, JobSpec

ADDON_ROOT = Path(__file__).resolve().parent


def package_name() -> str:
    return __package__ or "im3d_blender"


def preferences():
    addon = bpy.context.preferences.addons.get(package_name())
    return addon.preferences if addon is not None else None


def user_dir(*parts: str) -> Path:
    """Writable per-user folder of the extension (survives updates); plain-package fallback for scripts."""
    try:
        base = Path(bpy.utils.extension_path_user(package_name(), path="", create=True))
    except (ValueError, RuntimeError):
        base = Path(bpy.utils.user_resource("DATAFILES", path="im3d", create=True))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_backend_source() -> Path:
    """The backend source shipped inside the extension zip (or the repository's, when run from a checkout)."""
    bundled = ADDON_ROOT / "backend"
    return bundled if (bundled / "pyproject.toml").exists() else ADDON_ROOT.parent / "backend"


# ----------------------------------------------------------------------------------------------
# Backend


class Backend:
    process: BackendProcess | None = None
    setup_log: deque = deque(maxlen=200)
    setup_thread: threading.Thread | None = None
    setup_error: str = ""
    setup_cancel = threading.Event()


def backend_python(prefs) -> Path:
    if prefs.python_path:
        return Path(bpy.path.abspath(prefs.python_path))
    return env_python(Path(prefs.env_dir) if prefs.env_dir else user_dir("backend-env"))


def local_process(prefs) -> BackendProcess:
    """The local backend process object for the current preferences (not started)."""
    models = bpy.path.abspath(prefs.models_dir) if prefs.models_dir else ""
    extra_assignments = []
    if prefs.text_to_image_model:
        extra_assignments.append(f"diffusion.text_to_image_model={json.dumps(prefs.text_to_image_model)}")
    if prefs.orbit_model:
        extra_assignments.append(f"diffusion.orbit_model={json.dumps(prefs.orbit_model)}")
    wanted = BackendProcess(
        backend_python(prefs), user_dir("backend"), prefs.port, prefs.device, prefs.low_vram, models, extra_assignments
    )
    current = Backend.process
    if current is not None:  # set by scripts and tests (e.g. --runner), not by the preferences
        wanted.extra_args, wanted.extra_env = current.extra_args, current.extra_env
    if current is not None and current.command() == wanted.command() and current.python == wanted.python:
        return current
    if current is not None and current.running():
        return current  # settings changed while running: the user restarts to apply them
    Backend.process = wanted
    return wanted


def client_for(prefs, start: bool = True, wait: float = 90.0) -> BackendClient:
    """A client for the configured backend; starts the local one first when allowed."""
    if prefs.backend_mode == "REMOTE":
        return BackendClient(prefs.url, prefs.token, timeout=15.0)
    process = local_process(prefs)
    if start and prefs.auto_start and not process.running():
        try:
            process.client(timeout=1.0).health(timeout=1.0)  # one already running on that port (ours, from before)
            return process.client()
        except BackendError:
            process.start()
            process.wait_ready(wait)
    return process.client()


def stop_backend() -> None:
    if Backend.process is not None:
        Backend.process.stop()
        Backend.process = None


atexit.register(stop_backend)


def start_setup(prefs, synchronous: bool) -> None:
    Backend.setup_log.clear()
    Backend.setup_error = ""
    Backend.setup_cancel.clear()
    source, env_dir, tools = bundled_backend_source(), Path(prefs.env_dir) if prefs.env_dir else user_dir("backend-env"), user_dir("tools")

    def work():
        try:
            setup_environment(source, env_dir, tools, Backend.setup_log.append, Backend.setup_cancel.is_set)
            Backend.setup_log.append("done: start the backend below")
        except BackendError as error:
            Backend.setup_error = error.message
            Backend.setup_log.append("FAILED: " + error.message)

    if synchronous:
        work()
        return
    Backend.setup_thread = threading.Thread(target=work, name="im3d-setup", daemon=True)
    Backend.setup_thread.start()
    _ensure_timer()


# ----------------------------------------------------------------------------------------------
# The running job


@dataclass
class ActiveJob:
    run: JobRun
    kind: str
    name: str
    provenance: dict
    scene_name: str
    location: tuple
    source_object: str | None = None
    hide_original: bool = False
    started: float = field(default_factory=time.monotonic)
    on_done: Callable[["ActiveJob", str], None] | None = None  # called with "finished" | "failed" | "cancelled"


class Jobs:
    active: ActiveJob | None = None
    longest_pump_s: float = 0.0


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


def show_status(state, status: dict) -> None:
    state.job_id = status.get("id") or state.job_id
    state.job_state = str(status.get("state") or "")
    state.job_stage = str(status.get("stage") or "")
    state.job_message = str(status.get("message") or "")[:200]
    state.job_progress = max(0.0, min(1.0, float(status.get("progress") or 0.0)))
    state.job_eta = format_eta(status.get("eta_s"))


def apply_result(job: ActiveJob, result: JobResult):
    """Import a verified result (main thread); returns the new object. Raises ImportFailed/BackendError."""
    from .importer import import_result

    scene = bpy.data.scenes.get(job.scene_name) or bpy.context.scene
    beside = bpy.data.objects.get(job.source_object) if job.source_object else None
    if job.source_object and beside is None:
        raise BackendError("original_missing", f"the object {job.source_object!r} that was refined no longer exists; re-import from the history")
    job.provenance["job_id"] = result.job_id
    obj = import_result(
        result.files["mesh.glb"], scene=scene, name=job.name, provenance=job.provenance,
        location=None if beside is not None else job.location, beside=beside,
    )
    if beside is not None and job.hide_original:
        beside.hide_set(True)
        beside.hide_render = True
    entry = scene.im3d_history.add()
    entry.job_id, entry.kind, entry.name = result.job_id, job.kind, obj.name
    entry.prompt, entry.seed, entry.preset = job.provenance.get("prompt", ""), int(job.provenance.get("seed", 0)), job.provenance.get("preset", "")
    entry.folder = str(result.folder)
    entry.source_object = job.source_object or ""
    scene.im3d_history_index = len(scene.im3d_history) - 1
    return obj


def pump() -> float | None:
    """Drain the running job's events; the bpy.app.timers callback (returns the next interval)."""
    start = time.perf_counter()
    try:
        return _pump()
    finally:
        Jobs.longest_pump_s = max(Jobs.longest_pump_s, time.perf_counter() - start)


def _pump() -> float | None:
    job = Jobs.active
    setup_running = Backend.setup_thread is not None and Backend.setup_thread.is_alive()
    if job is None:
        redraw()
        return 0.5 if setup_running else None
    scene = bpy.data.scenes.get(job.scene_name) or bpy.context.scene
    state = scene.im3d
    outcome = None
    while True:
        try:
            kind, payload = job.run.events.get_nowait()
        except Exception:
            break
        if kind == "status":
            show_status(state, payload)
        elif kind == "preview":
            load_preview(state, payload)
        elif kind == "finished":
            try:
                obj = apply_result(job, payload)
                undo_push(f"IM-3D: import {obj.name}")
                state.job_state, state.job_error, state.job_message = "succeeded", "", f"imported {obj.name}"
                outcome = "finished"
            except Exception as error:  # ImportFailed, BackendError: the scene is unchanged
                state.job_state, state.job_error = "failed", getattr(error, "message", str(error))
                outcome = "failed"
        elif kind in ("failed", "cancelled"):
            state.job_state = "cancelled" if kind == "cancelled" else "failed"
            state.job_error = "" if kind == "cancelled" else payload.message
            state.job_message = payload.message if kind == "cancelled" else state.job_message
            outcome = kind
    if outcome is None:
        set_status_bar(f"IM-3D: {state.job_stage or state.job_state} {state.job_progress:.0%} {state.job_eta}")
        redraw()
        return 0.1
    Jobs.active = None
    set_status_bar(None)
    if outcome == "failed":
        set_status_bar(f"IM-3D failed: {state.job_error}")
    if job.on_done is not None:
        job.on_done(job, outcome)
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


def _ensure_timer() -> None:
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=0.1, persistent=False)


def start_job(job: ActiveJob) -> None:
    if Jobs.active is not None:
        raise BackendError("busy", "a job is already running; cancel it or wait for it to finish")
    Jobs.active = job
    job.run.start()
    _ensure_timer()


def cancel_active() -> bool:
    if Jobs.active is None:
        return False
    Jobs.active.run.cancel()
    return True


def shutdown() -> None:
    """On disable: stop the job thread's work, timers and the local backend."""
    if Jobs.active is not None:
        Jobs.active.run.cancel()
        Jobs.active = None
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)
    Backend.setup_cancel.set()
    stop_backend()


def parse_overrides(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise BackendError("invalid_request", f"the advanced overrides are not valid JSON ({error}); write e.g. {{\"recon\": {{\"steps\": 300}}}}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise BackendError("invalid_request", 'the advanced overrides must be {"section": {"key": value}}')
    return value


def results_dir() -> Path:
    return user_dir("results")


def job_spec_overrides(state, kind: str) -> dict:
    overrides: dict = {}
    if state.use_custom_settings:
        overrides.setdefault("pipeline", {})["refinement_rounds"] = state.refinement_rounds
        overrides.setdefault("mesh", {})["face_budget"] = state.face_budget
        overrides.setdefault("mesh", {})["texture_size"] = int(state.texture_size)
    if kind == "refine":
        if state.refine_use_diffusion:
            overrides.setdefault("diffusion", {})["refine_strengths"] = [state.refine_strength]
        else:
            overrides.setdefault("diffusion", {})["enabled"] = False
    for section, values in parse_overrides(state.advanced_overrides).items():
        overrides.setdefault(section, {}).update(values)
    return overrides


def make_spec(state, kind: str, views_dir: str | None = None) -> JobSpec:
    return JobSpec(
        kind=kind,
        prompt=state.prompt,
        negative_prompt=state.negative_prompt,
        image_path=bpy.path.abspath(state.image_path) if (state.image_path and kind == "generate") else None,
        views_dir=views_dir,
        seed=state.seed,
        preset=state.preset.lower(),
        overrides=job_spec_overrides(state, kind),
    )


def turntable_folder() -> Path:
    return Path(os.path.join(str(user_dir("turntables")), time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{time.monotonic_ns() % 100000}"))
