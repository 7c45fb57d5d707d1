"""The backend this Blender talks to: the local process (or a remote URL), its set-up, and getting it
ready without blocking Blender.

`Preparation` does the slow part in a worker thread: start the local backend when allowed (or adopt
an IM-3D backend of ours already on the port), wait for `/v1/health`, then ask the backend what it
knows (its presets, which models are present). The job flow in `runtime.py` polls it from a timer,
so the panel says "Starting the backend…" while Blender stays responsive. bpy is touched only
from the main thread (reading preferences when a preparation or set-up is created).
"""

from __future__ import annotations

import atexit
import json
import threading
from collections import deque
from pathlib import Path

import bpy

from .backend_process import BackendProcess
from .client import BackendClient, BackendError
from .paths import bundled_backend_source, user_dir
from .setup_env import env_python, setup_environment


class Backend:
    process: BackendProcess | None = None
    presets: dict | None = None  # GET /v1/presets of the last backend that answered, None: not known
    models: list | None = None  # GET /v1/models, None: the backend has no such route or never answered
    lpips_missing: bool = False  # learnt from /v1/models or a model_not_found error naming LPIPS
    missing: list = []  # names of missing models from /v1/models (text-to-image, orbit-video, lpips-vgg, ...)
    # set-up of the environment
    setup_log: deque = deque(maxlen=300)
    setup_thread: threading.Thread | None = None
    setup_error: str = ""
    setup_progress: float = 0.0
    setup_stage: str = ""
    setup_cancel = threading.Event()
    download_text: str | None = None
    starting: "Preparation | None" = None  # a Start pressed in the preferences, running in its thread


def env_dir(prefs) -> Path:
    return Path(bpy.path.abspath(prefs.env_dir)) if prefs.env_dir else user_dir("backend-env")


def backend_python(prefs) -> Path:
    if prefs.python_path:
        return Path(bpy.path.abspath(prefs.python_path))
    return env_python(env_dir(prefs))


def local_process(prefs) -> BackendProcess:
    """The local backend process object for the current preferences (not started)."""
    models = bpy.path.abspath(prefs.models_dir) if prefs.models_dir else ""
    extra_assignments = []
    if prefs.text_to_image_model:
        extra_assignments.append(f"diffusion.text_to_image_model={json.dumps(prefs.text_to_image_model)}")
    if prefs.orbit_model:
        extra_assignments.append(f"diffusion.orbit_model={json.dumps(prefs.orbit_model)}")
    wanted = BackendProcess(
        backend_python(prefs), user_dir("backend"), prefs.port, prefs.device, prefs.low_vram, models, extra_assignments,
        env_dir=None if prefs.python_path else env_dir(prefs),
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


def client(prefs) -> BackendClient:
    """A client for the configured backend; starts nothing."""
    if prefs.backend_mode == "REMOTE":
        return BackendClient(prefs.url, prefs.token, timeout=15.0)
    return local_process(prefs).client()


class Preparation:
    """Get the backend ready (off the main thread when started with `start()`) and learn what it offers."""

    def __init__(self, prefs, preset: str = "standard"):
        self.preset = preset
        self.remote = prefs.backend_mode == "REMOTE"
        self.auto_start = prefs.auto_start
        self.client = client(prefs)
        self.process = None if self.remote else local_process(prefs)
        self.error: BackendError | None = None
        self.health: dict | None = None
        self.stage = "checking"
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def start(self) -> "Preparation":
        self._thread = threading.Thread(target=self.run, name="im3d-prepare", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> None:
        try:
            if self.process is not None:
                if self.auto_start and not self.process.running() and not self.process.ready:
                    self.stage = "starting"
                self.health = self.process.ensure_ready(90.0, self._cancel.is_set, start=self.auto_start)
            else:
                self.health = self.client.health()
            self.stage = "checking"
            learn_from(self.client, self.preset)
        except BackendError as error:
            self.error = error
        except Exception as error:  # a bug must end the job in the panel, not hang it
            self.error = BackendError("internal_error", f"getting the backend ready failed: {error!r}")


def start_in_background(preparation: Preparation) -> None:
    Backend.starting = preparation.start()


def busy_in_background() -> bool:
    """Something the preferences show is changing (set-up, a start): keep redrawing them."""
    return setup_running() or (Backend.starting is not None and not Backend.starting.done)


def learn_from(backend: BackendClient, preset: str = "standard") -> None:
    """What the backend offers: presets (so the panel need not repeat its defaults) and model presence."""
    Backend.presets = _optional_get(backend, "/v1/presets")
    models = _optional_get(backend, f"/v1/models?preset={preset}")
    if models is None:
        return  # an older backend: a job's model_not_found error teaches us instead (note_model_error)
    if isinstance(models, dict) and isinstance(models.get("missing"), list):
        Backend.missing = [str(name) for name in models["missing"]]
        Backend.lpips_missing = any("lpips" in name.lower() for name in Backend.missing)
    else:
        Backend.models = models.get("models") if isinstance(models, dict) else models
        Backend.lpips_missing = lpips_missing_in(Backend.models)


def _optional_get(backend: BackendClient, path: str):
    """A route an older backend may not have: None when it answers 404 or cannot answer now."""
    try:
        return backend.json("GET", path, timeout=5.0)
    except BackendError:
        return None


def lpips_missing_in(models) -> bool:
    """True when the backend's model list names an LPIPS backbone that is not present."""
    if not isinstance(models, list):
        return False
    for entry in models:
        if not isinstance(entry, dict):
            continue
        name = " ".join(str(entry.get(k, "")) for k in ("name", "id", "kind", "role")).lower()
        if "lpips" not in name:
            continue
        for key in ("present", "available", "installed", "downloaded", "ok"):
            if key in entry:
                return not bool(entry[key])
        status = str(entry.get("status", entry.get("state", ""))).lower()
        if status:
            return status not in ("present", "available", "installed", "ok", "ready")
    return False


def note_model_error(error: BackendError) -> None:
    """Remember a missing LPIPS backbone from a job's model_not_found error (backends without /v1/models)."""
    if error.code == "model_not_found" and "lpips" in error.message.lower():
        Backend.lpips_missing = True


def preset_values(preset: str) -> dict | None:
    """{"section": {"key": value}} of one preset as the backend reported it, or None when not known."""
    presets = Backend.presets
    if not isinstance(presets, dict):
        return None
    table = presets.get("presets", presets)
    if isinstance(table, list):
        table = {str(p.get("name")): p for p in table if isinstance(p, dict)}
    value = table.get(preset.lower()) if isinstance(table, dict) else None
    for key in ("values", "config"):  # {"overrides", "values"} (GET /v1/presets) or {"config"}
        if isinstance(value, dict) and isinstance(value.get(key), dict):
            value = value[key]
            break
    return value if isinstance(value, dict) else None


def stop_backend() -> None:
    if Backend.process is not None:
        Backend.process.stop()
        Backend.process = None


atexit.register(stop_backend)


# ----------------------------------------------------------------------------------------------
# Set-up of the environment (Preferences → Set up Backend)


def download_estimate() -> str:
    """"about 3.2 GB (86 packages)" for the bundled lock on this platform, read once (what Set up downloads)."""
    if Backend.download_text is None:
        from .setup_env import download_size, format_size

        try:
            size, count = download_size(bundled_backend_source() / "uv.lock")
            Backend.download_text = f"about {format_size(size)} ({count} packages)"
        except (OSError, ValueError, KeyError, ImportError):
            Backend.download_text = "a few GB"
    return Backend.download_text


def setup_running() -> bool:
    return Backend.setup_thread is not None and Backend.setup_thread.is_alive()


def start_setup(prefs, synchronous: bool, on_idle=None) -> None:
    if setup_running():
        raise BackendError("busy", "the backend is being set up already; wait for it or press Cancel")
    Backend.setup_log.clear()
    Backend.setup_error, Backend.setup_progress, Backend.setup_stage = "", 0.0, "starting"
    Backend.setup_cancel.clear()
    source, target, tools = bundled_backend_source(), env_dir(prefs), user_dir("tools")
    stop_backend()  # the environment is about to change under it

    def progress(fraction: float, text: str) -> None:
        Backend.setup_progress, Backend.setup_stage = fraction, text

    def work():
        try:
            setup_environment(source, target, tools, Backend.setup_log.append, Backend.setup_cancel.is_set, progress)
            Backend.setup_stage = "done: the backend starts by itself when a job needs it"
        except BackendError as error:
            Backend.setup_error = error.message
            Backend.setup_stage = "cancelled" if error.code == "setup_cancelled" else "failed"
            Backend.setup_log.append("FAILED: " + error.message)
        except Exception as error:  # never leave the preferences saying "setting up…" forever
            Backend.setup_error = f"set-up failed unexpectedly: {error!r}"
            Backend.setup_stage = "failed"

    if synchronous:
        work()
        return
    Backend.setup_thread = threading.Thread(target=work, name="im3d-setup", daemon=True)
    Backend.setup_thread.start()
    if on_idle is not None:
        on_idle()


def cancel_setup() -> bool:
    if not setup_running():
        return False
    Backend.setup_cancel.set()
    return True
