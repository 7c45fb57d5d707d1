"""The job runner: validation at submit, a FIFO queue, one worker thread, cancellation, recovery.

The pipeline is injected as `run_fn(request, workdir, config, progress, cancel) -> {name: path}`;
by default `im3d.pipeline.run_job`, imported on first use so that the HTTP server starts without
torch and the worker keeps models warm for the life of the process.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from im3d.config import Config, ConfigError, config_from_dict, load_config
from im3d.request import JobInputs, JobRequest, check_inputs
from im3d.device import describe_device
from im3d.errors import Cancelled, Im3dError, as_im3d_error, storage_error
from im3d.service.store import FILE_NAME_RE, Job, JobStore

log = logging.getLogger("im3d.jobs")

PERSIST_INTERVAL_S = 1.0

RunFn = Callable[..., Mapping[str, Path]]


def _default_run_fn(*args: Any, **kwargs: Any) -> Mapping[str, Path]:
    from im3d.pipeline import run_job  # heavy (torch, diffusers): imported on the first job only

    return run_job(*args, **kwargs)


# Settings that describe this machine rather than a job: a job takes them from the server's config.
# Which models this machine uses is its own setting too: the add-on's model preferences reach the
# backend as start-up settings, and GET /v1/models, preflight and the jobs must agree on them.
SITE_SETTINGS = {"pipeline": ("device",), "diffusion": ("models_dir", "text_to_image_model", "orbit_model")}


def _check_models(config: Config, request: Mapping[str, Any]) -> None:
    from im3d.weights import preflight

    preflight(config, request)


class JobManager:
    """Accepts jobs, runs them one at a time in submission order on a worker thread."""

    def __init__(self, store: JobStore, run_fn: RunFn | None = None, config: Config | None = None):
        self.store = store
        self.run_fn = run_fn or _default_run_fn
        # Preflight (im3d.weights): the real pipeline's models are checked at submit; an injected
        # run_fn (tests, other executors) loads no models of ours, so it is not checked.
        self.check_models = _check_models if run_fn is None else None
        self.config = config or Config()
        self.max_queue = self.config.server.max_queue
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._running: str | None = None
        self._stopping = False
        self._closed = False  # after shutdown nothing more is written
        self._worker: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> list[str]:
        """Recover from a previous run, then start the worker; returns the ids marked interrupted."""
        self.store.prepare()
        self.store.prune_uploads()
        interrupted = []
        for job in self.store.load_jobs():
            if job.state in ("queued", "running"):
                was = job.state
                job.state = "interrupted"
                job.finished = job.finished or time.time()
                job.message = f"the backend stopped while this job was {was}; run it again"
                job.error = {"code": "interrupted", "message": job.message}
                try:
                    (self.store.root / job.id / "manifest.json").unlink(missing_ok=True)
                except OSError:
                    pass
                interrupted.append(job.id)
                self._persist(job, force=True)
            self._jobs[job.id] = job
        if interrupted:
            log.warning("marked %d job(s) interrupted after an unclean stop: %s", len(interrupted), ", ".join(interrupted))
        self._worker = threading.Thread(target=self._work, name="im3d-job-worker", daemon=True)
        self._worker.start()
        return interrupted

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel the running one and mark it (and queued ones) interrupted."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            for job_id in list(self._queue):
                self._finish(self._jobs[job_id], "interrupted", message="the backend was shut down before this job started; run it again")
            self._queue.clear()
            running = self._jobs.get(self._running) if self._running else None
            if running is not None:
                running.cancel_event.set()
            self._wakeup.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        with self._lock:
            running = self._jobs.get(self._running) if self._running else None
            if running is not None and running.state == "running":
                log.warning("job %s did not stop within %.0f s; marking it interrupted", running.id, timeout)
                self._finish(running, "interrupted", message="the backend was shut down while this job was running; run it again")
            self._closed = True

    # -- queries
    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def running_job(self) -> str | None:
        with self._lock:
            return self._running

    def status(self, job_id: str) -> dict[str, Any]:
        self.store.job_dir(job_id)  # validates the id
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise Im3dError("job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
            status = self._public(job)
        if status["state"] == "succeeded":
            status["artifacts"] = [
                {k: e[k] for k in ("name", "size", "sha256")} for e in self.store.verified_artifacts(job_id)
            ]
        return status

    def list_statuses(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = sorted(self._jobs, key=lambda i: (self._jobs[i].created, i), reverse=True)
        return [self.status(i) for i in ids]

    def _public(self, job: Job) -> dict[str, Any]:
        eta = None
        if job.state == "running" and job.started and job.progress >= 0.01:
            elapsed = time.time() - job.started
            if elapsed > 0.5:
                eta = round(elapsed * (1.0 - job.progress) / job.progress, 1)
        return {
            "id": job.id,
            "kind": job.kind,
            "state": job.state,
            "stage": job.stage,
            "progress": job.progress,
            "message": job.message,
            "eta_s": eta,
            "error": dict(job.error) if job.error else None,
            "artifacts": [],
            "previews": list(job.previews),
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "request": dict(job.request),
        }

    # -- commands
    def job_config(self, preset: str, overrides: Mapping[str, Any], seed: int) -> Config:
        """A job's config: resolved from the defaults by `load_config` (the preset, then the
        request's overrides), never merged onto the server's own start-up config. Only this
        machine's site settings (SITE_SETTINGS) come from the server's config."""
        if "server" in overrides:
            raise Im3dError("invalid_config", "overrides cannot change the server section; set it when starting the backend")
        site: dict[str, dict[str, Any]] = {}
        for section, keys in SITE_SETTINGS.items():
            site[section] = {key: getattr(getattr(self.config, section), key) for key in keys}
        merged = json.loads(json.dumps(site))
        for section, values in overrides.items():
            merged.setdefault(section, {}).update(values)
        merged.setdefault("pipeline", {})["seed"] = seed
        try:
            return load_config(preset, overrides=merged)
        except ConfigError as error:
            raise Im3dError("invalid_config", f"overrides: {error.message}") from None

    def submit(self, request: JobRequest | Mapping[str, Any], artist: str = "") -> str:
        """Validate a job request, copy its inputs, queue it; returns the id."""
        if not isinstance(request, JobRequest):
            try:
                request = JobRequest.model_validate(dict(request))
            except ValidationError as error:
                raise Im3dError("invalid_request", "; ".join(e["msg"] for e in error.errors()[:5])) from None
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        config = self.job_config(request.preset, request.overrides, seed)

        uploads = {}
        for slot, wanted in (("image", "image"), ("views", "views")):
            upload_id = getattr(request, slot)
            if upload_id is None:
                continue
            meta = self.store.upload_meta(upload_id)
            if meta is None:
                raise Im3dError("upload_not_found", f"{slot}: there is no upload {upload_id!r}; upload the file with POST /v1/uploads first")
            if meta["kind"] != wanted:
                expected = "a PNG or JPEG image" if wanted == "image" else "a zip of a views folder (transforms.json + images)"
                raise Im3dError("wrong_upload_kind", f"{slot}: upload {upload_id} is a {meta['kind']} upload, but {slot} must be {expected}")
            uploads[slot] = meta
        check_inputs(request.kind, request.prompt, "image" in uploads, "views" in uploads, config.diffusion.enabled)
        if self.check_models is not None:
            self.check_models(config, {"kind": request.kind, "image": request.image})  # every missing model, in ms

        kind = request.kind
        public = request.model_dump()
        public["seed"] = int(seed)

        with self._lock:
            if self._stopping:
                raise Im3dError("shutting_down", "the backend is shutting down; start it again and resubmit")
            busy = self._running is not None or bool(self._queue)
            if busy and len(self._queue) >= self.max_queue:
                raise Im3dError("queue_full", f"{len(self._queue)} jobs are already waiting (server.max_queue); wait for one to finish or cancel one")
            self._admit(artist)
            job_id = self.store.new_job_id()
            job_dir = self.store.root / job_id
            try:
                job_dir.mkdir(parents=True)  # reserves the id while the lock is held
            except OSError as error:
                raise storage_error(error, "create the job folder") from None
        try:
            for meta in uploads.values():
                self.store.copy_input(meta, job_dir)
            (job_dir / "previews").mkdir(exist_ok=True)
            job = Job(id=job_id, kind=kind, request=public, config=config.to_dict())
            self.store.write_job(job, job.record())
        except OSError as error:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise storage_error(error, "write the job's inputs to") from None
        with self._lock:
            if self._stopping:
                self._jobs[job_id] = job
                self._finish(job, "interrupted", message="the backend was shut down before this job started; run it again")
                raise Im3dError("shutting_down", "the backend is shutting down; start it again and resubmit")
            self._jobs[job_id] = job
            self._enqueue(job_id, artist)
            self._wakeup.notify_all()
        log.info("job %s queued (%s)%s", job_id, kind, f" for {artist}" if artist else "")  # the artist's name, never a token
        return job_id

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.store.job_dir(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise Im3dError("job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
            if job.state == "queued":
                self._queue.remove(job_id)
                self._finish(job, "cancelled", message="cancelled before it started")
            elif job.state == "running":
                job.cancel_event.set()
                job.message = "cancelling..."
                job.version += 1
        return self.status(job_id)

    # -- worker
    def _take_next(self) -> Job | None:
        """Wait for a queued job and mark it running (`_mark_running`); None once stopping."""
        with self._lock:
            while not self._queue and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            job = self._jobs[self._queue.popleft()]
            self._mark_running(job)
            job.state = "running"
            job.started = time.time()
            job.message = "starting"
            job.version += 1
            return job

    def _mark_running(self, job: Job) -> None:
        """Under the lock, as `job` starts: one worker thread, so it is *the* running job."""
        self._running = job.id

    def _work(self) -> None:
        while (job := self._take_next()) is not None:
            try:
                self._run_guarded(job, "job worker")
            finally:
                with self._lock:
                    self._running = None

    def _run_guarded(self, job: Job, runner: str) -> None:
        """Run one job; an unexpected error fails that job and never kills the thread running it."""
        try:
            self._persist(job, force=True)
            self._run(job)
        except BaseException:  # log and carry on with the next job
            log.exception("%s error while running %s", runner, job.id)
            with self._lock:
                if job.state == "running":
                    self._finish(job, "failed", "internal_error", f"unexpected error in the {runner}; see the backend log")

    def _run(self, job: Job) -> None:
        job_dir = self.store.root / job.id
        inputs = JobInputs(
            kind=job.kind,
            prompt=job.request.get("prompt") or "",
            negative_prompt=job.request.get("negative_prompt") or "",
            image=next((p for p in (job_dir / "inputs").glob("image.*")), None) if job.request.get("image") else None,
            views=(job_dir / "inputs" / "views") if job.request.get("views") else None,
        )

        def progress(stage: str, fraction: float, message: str = "", preview: Path | str | None = None) -> None:
            now = time.time()
            with self._lock:
                if job.state != "running":
                    return
                if stage != job.stage:
                    if job.stages and job.stages[-1].get("finished") is None:
                        job.stages[-1]["finished"] = now
                    job.stages.append({"stage": str(stage), "started": now, "finished": None})
                    job.stage = str(stage)
                try:
                    job.progress = min(1.0, max(0.0, float(fraction)))
                except (TypeError, ValueError):
                    pass
                job.message = str(message)
                if preview is not None:
                    name = Path(preview).name
                    if FILE_NAME_RE.match(name) and name not in job.previews:
                        job.previews.append(name)
                job.version += 1
            self._persist(job)

        def cancel() -> bool:
            return job.cancel_event.is_set()

        try:
            config = config_from_dict(job.config)
            artifacts = self.run_fn(inputs, job_dir, config, progress, cancel)
            if job.cancel_event.is_set():
                raise Cancelled()
            self.store.write_manifest(job.id, artifacts or {})
        except Cancelled:
            with self._lock:
                if self._stopping:
                    self._finish(job, "interrupted", message="the backend was shut down while this job was running; run it again")
                else:
                    self._finish(job, "cancelled", message=f"cancelled during {job.stage or 'start-up'}")
            return
        except Exception as error:  # noqa: BLE001 - every failure must end the job with a code and a message
            known = as_im3d_error(error, job_dir)
            if known is None:
                self._fail_unexpected(job, error)
            else:
                self._fail(job, known.code, known.message)
            return
        with self._lock:
            if job.cancel_event.is_set() and not self._stopping:
                # Cancel arrived while the manifest was written: the artist was told "cancelling",
                # so the job ends cancelled and offers nothing (the manifest goes, the lock keeps
                # a later cancel from slipping in between this check and the state change).
                (job_dir / "manifest.json").unlink(missing_ok=True)
                self._finish(job, "cancelled", message=f"cancelled during {job.stage or 'start-up'}")
                return
            if job.stages and job.stages[-1].get("finished") is None:
                job.stages[-1]["finished"] = time.time()
            job.progress = 1.0
            self._finish(job, "succeeded", message="done")
        log.info("job %s succeeded in %.1f s", job.id, (job.finished or 0) - (job.started or 0))

    def _fail(self, job: Job, code: str, message: str) -> None:
        log.warning("job %s failed: %s: %s", job.id, code, message)
        with self._lock:
            self._finish(job, "failed", code, message)

    def _fail_unexpected(self, job: Job, error: BaseException) -> None:
        text = "".join(traceback.format_exception(error))
        log.error("job %s failed with an unexpected error:\n%s", job.id, text)
        try:
            (self.store.root / job.id / "error.log").write_text(text, encoding="utf-8")
        except OSError:
            pass
        self._fail(job, "internal_error", f"unexpected error: {type(error).__name__}: {error}; see error.log in the job folder and the backend log")

    def _finish(self, job: Job, state: str, code: str | None = None, message: str = "") -> None:
        """Move `job` to a final state (caller holds the lock) and persist it."""
        job.state = state
        job.finished = time.time()
        job.message = message
        if state in ("failed", "interrupted"):
            job.error = {"code": code or state, "message": message}
        if job.stages and job.stages[-1].get("finished") is None:
            job.stages[-1]["finished"] = job.finished
        job.version += 1
        self._persist(job, force=True)

    def _persist(self, job: Job, force: bool = False) -> None:
        """Write job.json if it changed: at once when `force`, else at most once per second."""
        with self._lock:
            if self._closed:
                return
            if not force and time.time() - getattr(job, "_last_write", 0.0) < PERSIST_INTERVAL_S:
                return
            job._last_write = time.time()  # type: ignore[attr-defined]
            version, record = job.version, job.record()
        with job.write_lock:
            if version <= job.written_version:
                return
            try:
                self.store.write_job(job, record)
                job.written_version = version
            except OSError as error:
                log.error("could not write job.json of %s: %s", job.id, error)

    # -- health helpers
    def device(self) -> str:
        return describe_device(self.config.pipeline.device)

    def models_loaded(self) -> list[str]:
        """Models held warm by this process (the diffusion model cache), without importing it."""
        models = sys.modules.get("im3d.diffusion.models")
        if models is None:
            return []
        try:
            return [str(m) for m in models.loaded_models()]
        except Exception:  # noqa: BLE001 - health must answer even if the model cache misbehaves
            log.exception("could not list the loaded models")
            return []

    # -- executor hooks: the ray executor (service/ray_executor.py) overrides these
    executor_name = "local"

    def _admit(self, artist: str) -> None:
        """Refuse a job this executor cannot queue now beyond server.max_queue (caller holds the lock)."""

    def _enqueue(self, job_id: str, artist: str) -> None:
        self._queue.append(job_id)

    def workers(self) -> list[dict[str, Any]]:
        """This process as the one worker (GET /v1/health lists the workers of every executor)."""
        return [{"name": "local", "alive": True, "device": self.device(), "models_loaded": self.models_loaded(), "running_job": self.running_job}]
