"""One backend job from upload to verified download, off Blender's main thread. Standard library only.

`JobRun.run()` does everything synchronously (headless operators, scripts, tests); `JobRun.start()`
runs the same in a daemon thread and posts events to `JobRun.events`, which the add-on drains on
the main thread from a timer. Nothing here touches bpy.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import ACTIVE_STATES, BackendClient, BackendError, build_job_request

# Consecutive failed polls before a running job is declared lost (the backend died or hangs).
MAX_POLL_FAILURES = 4


@dataclass
class JobSpec:
    kind: str
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str | None = None  # a PNG/JPEG to upload
    views_dir: str | None = None  # a folder holding transforms.json + images, zipped and uploaded
    seed: int | None = None
    preset: str = "standard"
    overrides: dict = field(default_factory=dict)
    artifacts: tuple[str, ...] = ("mesh.glb", "preview.png")  # what the add-on downloads


def check_spec(spec: JobSpec) -> None:
    """The request's rules (client.build_job_request), checked when the artist clicks — before any
    turntable or upload — with stand-ins for the upload ids that do not exist yet."""
    build_job_request(
        spec.kind, prompt=spec.prompt, negative_prompt=spec.negative_prompt, image="pending" if spec.image_path else None,
        views="pending" if spec.views_dir or spec.kind != "generate" else None, seed=spec.seed, preset=spec.preset, overrides=spec.overrides,
    )


@dataclass
class JobResult:
    job_id: str
    status: dict
    files: dict[str, Path]
    folder: Path


class JobCancelled(BackendError):
    def __init__(self, message: str = "the job was cancelled"):
        super().__init__("cancelled", message)


def zip_views(folder: str | os.PathLike) -> bytes:
    """transforms.json (or transforms_train.json) and the images it lists, with relative paths only."""
    folder = Path(folder)
    names = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    if not any(p.name in ("transforms.json", "transforms_train.json") for p in names):
        raise BackendError("invalid_request", f"{folder} holds no transforms.json to upload")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for path in names:
            if path.suffix.lower() in (".json", ".png", ".jpg", ".jpeg"):
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


class JobRun:
    def __init__(self, client: BackendClient, spec: JobSpec, results_root: str | os.PathLike, poll_interval: float = 0.25):
        self.client, self.spec = client, spec
        self.results_root = Path(results_root)
        self.poll_interval = poll_interval
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.job_id: str | None = None
        self.status: dict | None = None
        self.result: JobResult | None = None
        self.error: BackendError | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "JobRun":
        self._thread = threading.Thread(target=self._run_catching, name="im3d-job", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_catching(self) -> None:
        try:
            self.run()
        except BackendError:
            pass  # already posted as an event by run()
        except Exception as error:  # a bug must still end the job in the panel, not hang it
            self.error = BackendError("internal_error", f"the add-on failed while running the job: {error!r}")
            self.events.put(("failed", self.error))

    # -- the job
    def run(self) -> JobResult:
        try:
            self.result = self._run()
        except BackendError as error:
            self.error = error
            self.events.put(("cancelled" if isinstance(error, JobCancelled) else "failed", error))
            raise
        self.events.put(("finished", self.result))
        return self.result

    def _stage(self, stage: str, message: str, progress: float = 0.0) -> None:
        self.events.put(("status", {"id": self.job_id, "state": "uploading", "stage": stage, "progress": progress, "message": message, "eta_s": None}))

    def _check_cancel(self) -> None:
        if self._cancel.is_set() and self.job_id is None:
            raise JobCancelled("the job was cancelled before it reached the backend")

    def _run(self) -> JobResult:
        spec, client = self.spec, self.client
        # 1. inputs
        image_id = views_id = None
        if spec.image_path:
            self._stage("upload", "uploading the image")
            image_id = client.upload_file(spec.image_path)
        self._check_cancel()
        if spec.views_dir:
            self._stage("upload", "uploading the rendered views")
            views_id = client.upload(zip_views(spec.views_dir), "application/zip", "views.zip")
        self._check_cancel()
        # 2. the job
        request = build_job_request(
            spec.kind, prompt=spec.prompt, negative_prompt=spec.negative_prompt, image=image_id, views=views_id,
            seed=spec.seed, preset=spec.preset, overrides=spec.overrides,
        )
        self.job_id = client.create_job(request)
        folder = self.results_root / self.job_id
        # 3. wait, following progress and previews
        status = self._poll(folder)
        # 4. verified download
        if status["state"] == "cancelled":
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if status["state"] != "succeeded":
            error = status.get("error") or {}
            if status["state"] == "interrupted":
                raise BackendError("interrupted", error.get("message") or "the backend stopped while running this job; run it again")
            raise BackendError(error.get("code") or "job_failed", error.get("message") or f"job {self.job_id} {status['state']}")
        self._stage("download", "downloading the result", 1.0)
        listed = {a.get("name") for a in status.get("artifacts") or []}
        names = [n for n in spec.artifacts if n in listed or n == "mesh.glb"]
        files = client.download_artifacts(status, folder, names)
        return JobResult(self.job_id, status, files, folder)

    def _poll(self, folder: Path) -> dict:
        failures, cancel_sent, cancel_deadline = 0, False, 0.0
        last_preview: tuple | None = None
        while True:
            if self._cancel.is_set() and not cancel_sent:
                cancel_sent, cancel_deadline = True, time.monotonic() + 15.0
                try:
                    self.client.cancel(self.job_id)
                except BackendError as error:
                    raise JobCancelled(f"the job was cancelled here, but the backend could not be told ({error.message})") from None
            try:
                status = self.client.job(self.job_id)
                failures = 0
            except BackendError as error:
                if error.code not in ("backend_unreachable", "timeout"):
                    raise
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise BackendError(
                        "backend_lost",
                        f"the backend stopped answering while job {self.job_id} was running ({error.message}); "
                        "restart it from the add-on's preferences and run the job again",
                    ) from None
                time.sleep(self.poll_interval * 2)
                continue
            self.status = status
            self.events.put(("status", status))
            if status["state"] not in ACTIVE_STATES:
                return status
            if cancel_sent and time.monotonic() > cancel_deadline:
                raise JobCancelled(f"job {self.job_id} was cancelled; the backend had not stopped it after 15 s")
            previews = status.get("previews") or []
            key = (previews[-1], round(float(status.get("progress") or 0), 2)) if previews else None
            if key is not None and key != last_preview:
                last_preview = key
                self._fetch_preview(folder, previews[-1])
            time.sleep(self.poll_interval)

    def _fetch_preview(self, folder: Path, name: str) -> None:
        try:
            data = self.client.preview(self.job_id, name)
        except BackendError:
            return  # a preview is a nicety; the job goes on
        if not data.startswith(b"\x89PNG"):
            return
        path = folder / "previews" / os.path.basename(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".part")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        self.events.put(("preview", path))
