"""Preferences → Models: what the backend's jobs need, and Download Models with progress and Cancel.

The list and the download both run in the backend (GET /v1/models, POST /v1/models/pull), so they
work the same for a local backend and a remote GPU machine. The add-on only asks and polls: from a
worker thread, never Blender's main thread, with the preferences redrawn by a timer while it runs.
Headless (`blender -b`, tests) the operators run to completion synchronously, as every operator
of this add-on does.

The Hugging Face token (for gated models such as Stability's SV3D) is an add-on preference of
subtype PASSWORD: it is kept with Blender's preferences, never in a .blend; it travels only in the
body of the pull request and is never put in this module's state, a log or a message.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import bpy

from . import local_backend
from .client import BackendClient, BackendError
from .paths import preferences

POLL_S = 0.3


class Models:
    """State shared by the worker thread and the drawing code (plain values only)."""

    listing: dict | None = None  # the last GET /v1/models answer
    pull: dict | None = None  # the last pull status (GET /v1/models/pull)
    error: str = ""  # the last failure, in words, shown in red
    busy: str = ""  # "" | "checking" | "downloading" | "cancelling"
    thread: threading.Thread | None = None
    cancel = threading.Event()
    progress_seen: list = []  # pull progress values seen by polling (the bar, and tests)


def _preset() -> str:
    scene = getattr(bpy.context, "scene", None)
    props = getattr(scene, "im3d", None) if scene is not None else None
    value = str(getattr(props, "preset", "standard") or "standard").lower()
    return value if value in ("fast", "standard", "high") else "standard"


def _connection(prefs) -> tuple[BackendClient, Any]:
    """The client, and the local process to get ready first (None for a remote backend). Main thread."""
    if prefs.backend_mode == "REMOTE":
        return BackendClient(prefs.url, prefs.token, timeout=15.0), None
    process = local_backend.local_process(prefs)
    if prefs.auto_start or process.running():
        return None, process
    return process.client(timeout=15.0), None  # not started: the error says to press Start


def _ready(client: BackendClient | None, process: Any, cancel: Callable[[], bool]) -> BackendClient:
    """Start (or adopt) the local backend when that is allowed, off the main thread."""
    if process is not None:
        if not process.running() and not process.ready:
            Models.busy = "starting the backend"
        process.ensure_ready(90.0, cancel)
        return process.client(timeout=15.0)
    return client


def _remember(listing: dict) -> None:
    Models.listing = listing
    missing = listing.get("missing") if isinstance(listing, dict) else None
    if isinstance(missing, list):  # what the job panel checks before it starts a job
        local_backend.Backend.missing = [str(m) for m in missing]
        local_backend.Backend.lpips_missing = any("lpips" in str(m).lower() for m in missing)


def refresh_work(client: BackendClient, preset: str) -> None:
    _remember(client.json("GET", f"/v1/models?preset={preset}"))


def download_work(client: BackendClient, preset: str, token: str, names: list[str]) -> None:
    """POST the pull, then poll it to the end; Cancel asks the backend to stop between chunks."""
    body = {"preset": preset, "names": names, "token": token or None}
    status = client.json("POST", "/v1/models/pull", body)
    del body, token
    Models.pull, Models.progress_seen = status, [float(status.get("progress", 0.0))]
    cancel_sent = False
    while status.get("state") == "running":
        if Models.cancel.is_set() and not cancel_sent:
            Models.busy = "cancelling"
            status = client.json("POST", "/v1/models/pull/cancel")
            cancel_sent = True
        time.sleep(POLL_S)
        status = client.json("GET", "/v1/models/pull")
        Models.pull = status
        Models.progress_seen.append(float(status.get("progress", 0.0)))
    if status.get("state") == "failed":
        error = status.get("error") or {}
        Models.error = str(error.get("message") or status.get("message") or "the download failed")
    refresh_work(client, preset)


def _run(kind: str, client: BackendClient | None, process: Any, work: Callable[[BackendClient], None]) -> None:
    Models.busy, Models.error = kind, ""
    try:
        work(_ready(client, process, Models.cancel.is_set))
    except BackendError as error:
        Models.error = error.message
    except Exception as error:  # a bug must show in the preferences, not leave them "busy" forever
        Models.error = f"{kind} failed: {error!r}"
    finally:
        Models.busy = ""


def _start(kind: str, prefs, work: Callable[[BackendClient], None]) -> bool:
    if Models.thread is not None and Models.thread.is_alive():
        return False
    client, process = _connection(prefs)
    Models.cancel.clear()
    if bpy.app.background:  # headless: run to completion here
        _run(kind, client, process, work)
        return True
    Models.thread = threading.Thread(target=_run, args=(kind, client, process, work), name=f"im3d-models-{kind}", daemon=True)
    Models.thread.start()
    if not bpy.app.timers.is_registered(_redraw):
        bpy.app.timers.register(_redraw, first_interval=0.2)
    return True


def _redraw() -> float | None:
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()
    return 0.25 if Models.thread is not None and Models.thread.is_alive() else None


def busy() -> bool:
    return Models.thread is not None and Models.thread.is_alive() or bool(Models.busy)


class IM3D_OT_models_refresh(bpy.types.Operator):
    """Ask the backend which models its jobs need and which are on its disk (starts the local backend when allowed)"""

    bl_idname = "im3d.models_refresh"
    bl_label = "Check Models"

    def execute(self, context):
        preset = _preset()
        if not _start("checking", preferences(), lambda client: refresh_work(client, preset)):
            self.report({"WARNING"}, "the models are being checked or downloaded already")
            return {"CANCELLED"}
        if bpy.app.background and Models.error:
            self.report({"ERROR"}, Models.error)
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_models_download(bpy.types.Operator):
    """Download every missing model in the backend (only the files it loads; resumable; gated models need the Hugging Face token)"""

    bl_idname = "im3d.models_download"
    bl_label = "Download Models"

    def execute(self, context):
        prefs = preferences()
        preset, token = _preset(), prefs.hf_token.strip()
        started = _start("downloading", prefs, lambda client: download_work(client, preset, token, []))
        del token
        if not started:
            self.report({"WARNING"}, "a model download or check is already running")
            return {"CANCELLED"}
        if bpy.app.background and Models.error:
            self.report({"ERROR"}, Models.error)
            return {"CANCELLED"}
        return {"FINISHED"}


class IM3D_OT_models_cancel(bpy.types.Operator):
    """Stop the download (files already complete are kept; a later download continues)"""

    bl_idname = "im3d.models_cancel"
    bl_label = "Cancel Download"

    def execute(self, context):
        Models.cancel.set()
        return {"FINISHED"}


classes = (IM3D_OT_models_refresh, IM3D_OT_models_download, IM3D_OT_models_cancel)


def format_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"


def model_rows(listing: dict | None) -> list[dict]:
    """One row per needed model, as the preferences show it (bpy-free, so tests read the same)."""
    rows = []
    for m in (listing or {}).get("models", []) if isinstance(listing, dict) else []:
        present = m.get("status") == "present"
        size = format_bytes(m.get("size_on_disk")) if present else f"{format_bytes(m.get('download_bytes'))} to download"
        rows.append({
            "name": str(m.get("name", "?")),
            "status": str(m.get("status", "?")),
            "present": present,
            "size": size,
            "licence": str(m.get("licence") or "licence: see page"),
            "gated": bool(m.get("gated")),
            "url": str(m.get("licence_url") or ""),
            "model_id": str(m.get("model_id", "")),
            "problem": "" if present else "; ".join(map(str, m.get("problems") or [])),
        })
    return rows


def draw(prefs, context, box) -> None:
    """The Models box of the add-on preferences (called by IM3D_AddonPreferences.draw)."""
    from .preferences import draw_wrapped

    box.label(text="Models", icon="FILE_3D")
    box.prop(prefs, "text_to_image_model")
    box.prop(prefs, "orbit_model")
    box.prop(prefs, "models_dir")
    box.prop(prefs, "hf_token")
    rows = model_rows(Models.listing)
    if Models.listing is None and not busy():
        box.label(text="Check Models asks the backend what its jobs need (it starts the local backend).", icon="INFO")
    if not rows and Models.listing is not None:
        box.label(text="The current settings need no models (diffusion and LPIPS off).", icon="CHECKMARK")
    for row in rows:
        line = box.row(align=True)
        line.label(text=row["name"], icon="CHECKMARK" if row["present"] else "ERROR")
        line.label(text=row["status"])
        line.label(text=row["size"])
        line.label(text=row["licence"][:40])
        if row["url"]:
            op = line.operator("wm.url_open", text="Licence (gated)" if row["gated"] else "Licence", icon="URL")
            op.url = row["url"]
        if row["problem"]:
            draw_wrapped(box, f"{row['model_id']}: {row['problem']}", "BLANK1")
    pull = Models.pull if isinstance(Models.pull, dict) else None
    if busy() and Models.busy in ("downloading", "cancelling") and pull is not None:
        box.progress(factor=float(pull.get("progress", 0.0)), type="BAR", text=str(pull.get("message", ""))[:80])
        box.operator("im3d.models_cancel", icon="CANCEL")
    elif busy():
        box.label(text=f"{Models.busy or 'working'}…", icon="TIME")
    else:
        line = box.row(align=True)
        missing = any(not r["present"] for r in rows)
        download = line.row()
        download.enabled = missing or Models.listing is None
        download.operator("im3d.models_download", icon="IMPORT")
        line.operator("im3d.models_refresh", icon="FILE_REFRESH")
        if any(r["gated"] and not r["present"] for r in rows):
            draw_wrapped(box, "Gated models: open the licence page, accept it with your Hugging Face account, then paste that account's access token above.", "INFO")
    if Models.error:
        draw_wrapped(box, Models.error, "ERROR")
    elif pull is not None and pull.get("state") == "succeeded" and not busy():
        box.label(text="All models downloaded.", icon="CHECKMARK")
