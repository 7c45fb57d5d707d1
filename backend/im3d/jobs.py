"""Job store on disk, FIFO queue with one worker thread, cancellation and crash recovery.

Every job lives in `<jobs_dir>/<id>/` (layout: docs/protocol.md). `job.json` is rewritten atomically
at every state change; `manifest.json` (artifact names, sizes, sha256) is written last, so a job that
died half-way has no manifest and is reported `interrupted` at the next start, never `succeeded`.

The pipeline is injected as `run_fn(request, workdir, config, progress, cancel) -> {name: path}`;
by default `im3d.pipeline.run_job`, imported on first use so that the HTTP server starts without
torch and the worker keeps models warm for the life of the process.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from im3d import __version__
from im3d.config import PRESETS, Config, ConfigError, config_from_dict
from im3d.errors import Cancelled, PipelineError
from im3d.io_utils import atomic_write_json

log = logging.getLogger("im3d.jobs")

KINDS = ("generate", "refine", "reconstruct")
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
JOB_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # one path component, no '..' prefix
RESERVED_NAMES = frozenset({"job.json", "manifest.json", "inputs", "previews", "error.log"})
UPLOADS_DIR = "_uploads"
UPLOAD_MAX_AGE_S = 7 * 24 * 3600
ZIP_MAX_MEMBERS = 10_000
PERSIST_INTERVAL_S = 1.0
HASH_CHUNK = 1 << 20

# errno values that mean "the output folder cannot take this write": report them as storage_error.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR}
if hasattr(errno, "EDQUOT"):
    STORAGE_ERRNOS.add(errno.EDQUOT)

RunFn = Callable[..., Mapping[str, Path]]


class ServiceError(Exception):
    """A request the service refuses; `status` is the HTTP status, `code`/`message` go to the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def storage_error(error: OSError, what: str, folder: Path | None = None) -> ServiceError:
    where = f" {error.filename}" if error.filename else (f" into {folder}" if folder else "")
    return ServiceError(
        507,
        "storage_error",
        f"could not {what}{where}: {error.strerror or error}; free disk space or set server.jobs_dir to a writable folder",
    )


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def regular_file_inside(root: Path, relative: str) -> Path | None:
    """`root/relative` if it is a regular file (not a symlink) whose real path stays inside `root`."""
    if not relative or "\\" in relative or "\0" in relative:
        return None
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or any(p in ("..", ".", "") for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (OSError, ValueError):
        return None
    return path


# ---------------------------------------------------------------------------------------------
# Uploads: safe zip extraction and light validation of a views dataset


def extract_zip_safely(zip_path: Path, dest: Path, max_total_bytes: int, max_members: int = ZIP_MAX_MEMBERS) -> None:
    """Unpack `zip_path` into the empty folder `dest`, refusing anything that could escape it.

    Refused: absolute paths, drive letters, backslashes, `..`, symlinks, encrypted members, more than
    `max_members` members, more than `max_total_bytes` unpacked (counted on the bytes actually
    decompressed, not the sizes the zip claims). `__MACOSX/` resource forks are skipped.
    """

    def refuse(message: str) -> ServiceError:
        return ServiceError(400, "invalid_upload", f"the views zip {message}; zip the dataset folder again with plain relative paths")

    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ServiceError(400, "invalid_upload", f"the upload is not a readable zip file ({error}); upload a .zip of the views folder") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_members:
            raise refuse(f"has {len(infos)} members, more than the {max_members} allowed")
        for info in infos:
            name = info.filename
            if "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
                raise refuse(f"member {name!r} has an absolute or non-portable path")
            if any(part == ".." for part in name.split("/")):
                raise refuse(f"member {name!r} points outside the archive ('..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise refuse(f"member {name!r} is a symlink, which is not allowed")
            if info.flag_bits & 0x1:
                raise refuse(f"member {name!r} is encrypted")
        dest.mkdir(parents=True, exist_ok=False)
        root = dest.resolve()
        total = 0
        for info in infos:
            parts = [p for p in info.filename.split("/") if p not in ("", ".")]
            if not parts or parts[0] == "__MACOSX":
                continue
            target = root.joinpath(*parts)
            if root not in target.parents:
                raise refuse(f"member {info.filename!r} points outside the archive")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    while chunk := source.read(HASH_CHUNK):
                        total += len(chunk)
                        if total > max_total_bytes:
                            raise refuse(f"unpacks to more than {max_total_bytes // (1 << 20)} MiB")
                        out.write(chunk)
            except FileExistsError:
                raise refuse(f"holds {info.filename!r} twice") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
                raise refuse(f"member {info.filename!r} cannot be decompressed ({error})") from None


VIEWS_JSON_NAMES = ("transforms.json", "transforms_train.json")  # Instant-NGP / NeRF-synthetic


def views_json(root: Path) -> Path | None:
    """The dataset JSON of a views folder, as `im3d.cameras.find_transforms` picks it."""
    for name in VIEWS_JSON_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def find_views_root(folder: Path) -> Path:
    """The folder holding `transforms.json` (or `transforms_train.json`): `folder` or its single sub-folder."""
    if views_json(folder) is not None:
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(subdirs) == 1 and not files and views_json(subdirs[0]) is not None:
        return subdirs[0]
    raise ServiceError(
        400, "invalid_upload", "the views zip has no transforms.json at its root (or inside one top-level folder); zip the dataset folder that holds transforms.json"
    )


def check_views_dataset(root: Path) -> int:
    """Light check of `root/transforms.json` (the pipeline does the full one); returns the frame count."""

    def refuse(message: str) -> ServiceError:
        return ServiceError(400, "invalid_upload", f"transforms.json {message}")

    try:
        data = json.loads(views_json(root).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise refuse(f"is not valid JSON ({error}); export the views again") from None
    frames = data.get("frames") if isinstance(data, dict) else None
    if not isinstance(frames, list) or not frames:
        raise refuse("has no 'frames' list; it needs one entry per image with file_path and transform_matrix")
    for index, frame in enumerate(frames):
        file_path = frame.get("file_path") if isinstance(frame, dict) else None
        if not isinstance(file_path, str) or not file_path:
            raise refuse(f"frame {index} has no 'file_path' string")
        relative = file_path[2:] if file_path.startswith("./") else file_path
        candidates = [relative] if PurePosixPath(relative).suffix else [relative, relative + ".png"]
        if not any(regular_file_inside(root, c) for c in candidates):
            raise refuse(f"frame {index} names {file_path!r}, which is not a file inside the zip; include every image it lists")
    return len(frames)


def detect_upload_kind(content_type: str, head: bytes) -> str:
    """'image' or 'views' from the declared type, checked against the file's signature."""
    if content_type == "image/png":
        ok, kind = head.startswith(b"\x89PNG\r\n\x1a\n"), "image"
    elif content_type == "image/jpeg":
        ok, kind = head.startswith(b"\xff\xd8\xff"), "image"
    elif content_type == "application/zip":
        ok, kind = head.startswith(b"PK\x03\x04"), "views"
    else:
        raise ServiceError(415, "unsupported_media_type", f"uploads must be image/png, image/jpeg or application/zip, not {content_type or 'missing'}")
    if not ok:
        raise ServiceError(400, "invalid_upload", f"the uploaded bytes are not a {content_type} file (wrong signature); check the file and its Content-Type")
    return kind


# ---------------------------------------------------------------------------------------------
# The job store


@dataclass
class Job:
    id: str
    kind: str
    request: dict[str, Any]  # the public request (upload ids, resolved seed)
    config: dict[str, Any]  # the resolved config
    state: str = "queued"
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    error: dict[str, str] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    previews: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # [{stage, started, finished}]
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    version: int = 0  # bumped at every change; job.json is written only when it grew
    written_version: int = -1
    write_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "stage": self.stage,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "previews": list(self.previews),
            "stages": [dict(s) for s in self.stages],
            "request": self.request,
            "config": self.config,
            "backend_version": __version__,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> "Job":
        job = cls(id=data["id"], kind=data["kind"], request=dict(data["request"]), config=dict(data.get("config") or {}))
        job.state = data["state"] if data.get("state") in STATES else "interrupted"
        for name in ("stage", "message"):
            setattr(job, name, str(data.get(name) or ""))
        job.progress = float(data.get("progress") or 0.0)
        job.error = data.get("error")
        job.created = float(data.get("created") or 0.0)
        job.started = data.get("started")
        job.finished = data.get("finished")
        job.previews = [p for p in data.get("previews") or [] if isinstance(p, str) and FILE_NAME_RE.match(p)]
        job.stages = list(data.get("stages") or [])
        return job


class JobStore:
    """Job folders and uploads under one root; every write is atomic."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.uploads = self.root / UPLOADS_DIR
        self._verified: dict[str, tuple] = {}  # job id -> (manifest stat key, verified entries)
        self._verify_lock = threading.Lock()

    def prepare(self) -> None:
        """Create the folders and prove they are writable; a clear error otherwise."""
        try:
            self.uploads.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise storage_error(error, "use the jobs folder") from None

    # -- jobs
    def new_job_id(self) -> str:
        while True:
            job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
            if not (self.root / job_id).exists():
                return job_id

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID_RE.match(job_id):
            raise ServiceError(404, "job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
        return self.root / job_id

    def write_job(self, job: Job, record: dict[str, Any]) -> None:
        atomic_write_json(self.root / job.id / "job.json", record)

    def load_jobs(self) -> list[Job]:
        jobs = []
        if not self.root.is_dir():
            return jobs
        for path in sorted(self.root.iterdir()):
            if not JOB_ID_RE.match(path.name) or not path.is_dir():
                continue
            try:
                jobs.append(Job.from_record(json.loads((path / "job.json").read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("skipping job folder %s: unreadable job.json (%s)", path, error)
        return jobs

    def write_manifest(self, job_id: str, artifacts: Mapping[str, Path | str]) -> list[dict[str, Any]]:
        """Hash every artifact and write `manifest.json` last; refuse names or paths that could escape."""
        job_dir = (self.root / job_id).resolve()
        entries = []
        for name, path in sorted(artifacts.items()):
            if not isinstance(name, str) or not FILE_NAME_RE.match(name) or name in RESERVED_NAMES:
                raise PipelineError("internal_error", f"the pipeline returned an invalid artifact name {name!r}")
            path = Path(path)
            if not path.is_absolute():
                path = job_dir / path
            try:
                relative = path.absolute().relative_to(job_dir).as_posix()
            except ValueError:
                raise PipelineError("internal_error", f"artifact {name} ({path}) is outside the job folder") from None
            if regular_file_inside(job_dir, relative) is None:
                raise PipelineError("internal_error", f"artifact {name} ({path}) is missing, a symlink or not a regular file")
            size, digest = sha256_file(path)
            entries.append({"name": name, "path": relative, "size": size, "sha256": digest})
        atomic_write_json(job_dir / "manifest.json", {"artifacts": entries})
        return entries

    def verified_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """Manifest entries whose files exist with the listed size (sha256 checked once per process)."""
        job_dir = self.root / job_id
        manifest = job_dir / "manifest.json"
        try:
            info = manifest.stat()
            key = (info.st_mtime_ns, info.st_size)
        except OSError:
            return []
        with self._verify_lock:
            cached = self._verified.get(job_id)
            if cached is None or cached[0] != key:
                cached = (key, self._verify(job_dir, manifest))
                self._verified[job_id] = cached
            entries = cached[1]
        # Sizes are re-checked on every call: cheap, and catches a file replaced after hashing.
        good = []
        for entry in entries:
            path = regular_file_inside(job_dir, entry["path"])
            if path is not None and path.stat().st_size == entry["size"]:
                good.append(entry)
        return good

    def _verify(self, job_dir: Path, manifest: Path) -> list[dict[str, Any]]:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = data["artifacts"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; the job's artifacts are not served", manifest)
            return []
        good = []
        for entry in listed if isinstance(listed, list) else []:
            try:
                name, relative, size, digest = entry["name"], entry["path"], int(entry["size"]), entry["sha256"]
            except (KeyError, TypeError, ValueError):
                continue
            if not isinstance(name, str) or not FILE_NAME_RE.match(name) or not isinstance(relative, str):
                continue
            path = regular_file_inside(job_dir, relative)
            if path is None or sha256_file(path) != (size, digest):
                log.warning("artifact %s of %s is missing or changed on disk; not served", name, job_dir.name)
                continue
            good.append({"name": name, "path": relative, "size": size, "sha256": digest})
        return good

    def artifact_path(self, job_id: str, name: str) -> Path | None:
        for entry in self.verified_artifacts(job_id):
            if entry["name"] == name:
                return regular_file_inside(self.root / job_id, entry["path"])
        return None

    def preview_path(self, job_id: str, name: str) -> Path | None:
        if not FILE_NAME_RE.match(name) or not name.lower().endswith(".png"):
            return None
        return regular_file_inside(self.root / job_id / "previews", name)

    # -- uploads
    def upload_meta(self, upload_id: str) -> dict[str, Any] | None:
        if not isinstance(upload_id, str) or not UPLOAD_ID_RE.match(upload_id):
            return None
        try:
            return json.loads((self.uploads / upload_id / "upload.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def new_upload_dir(self) -> tuple[str, Path]:
        upload_id = secrets.token_hex(16)
        staging = self.uploads / f".staging-{upload_id}"
        try:
            staging.mkdir(parents=True)
        except OSError as error:
            raise storage_error(error, "store the upload in") from None
        return upload_id, staging

    def finish_upload(
        self, upload_id: str, staging: Path, content_type: str, kind: str, size: int, digest: str, filename: str, max_unpacked: int
    ) -> dict[str, Any]:
        """Validate and (for zips) unpack a staged upload, then move it into place atomically."""
        meta = {
            "upload_id": upload_id,
            "kind": kind,
            "content_type": content_type,
            "size": size,
            "sha256": digest,
            "filename": re.sub(r"[^A-Za-z0-9_. -]", "_", filename)[:128],
            "created": time.time(),
        }
        try:
            if kind == "views":
                extract_zip_safely(staging / "data", staging / "views", max_unpacked)
                root = find_views_root(staging / "views")
                meta["frames"] = check_views_dataset(root)
                meta["views_root"] = root.relative_to(staging).as_posix()
                (staging / "data").unlink()  # the unpacked folder is what jobs use
            atomic_write_json(staging / "upload.json", meta)
            os.replace(staging, self.uploads / upload_id)
        except OSError as error:
            raise storage_error(error, "store the upload in") from None
        return meta

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def prune_uploads(self, max_age_s: float = UPLOAD_MAX_AGE_S) -> None:
        if not self.uploads.is_dir():
            return
        now = time.time()
        for path in self.uploads.iterdir():
            try:
                if path.name.startswith(".staging-") or now - path.stat().st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass

    def copy_input(self, upload: Mapping[str, Any], job_dir: Path) -> Path:
        """Hard-link (or copy) an upload into `job_dir/inputs`; returns the path the pipeline gets."""
        source = self.uploads / upload["upload_id"]
        inputs = job_dir / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        if upload["kind"] == "image":
            suffix = ".png" if upload["content_type"] == "image/png" else ".jpg"
            target = inputs / f"image{suffix}"
            _link_or_copy(source / "data", target)
            return target
        target = inputs / "views"
        shutil.copytree(source / upload["views_root"], target, copy_function=_link_or_copy, symlinks=True)
        return target


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ---------------------------------------------------------------------------------------------
# The manager: validation, FIFO queue, worker thread


def _default_run_fn(*args: Any, **kwargs: Any) -> Mapping[str, Path]:
    from im3d.pipeline import run_job  # heavy (torch, diffusers): imported on the first job only

    return run_job(*args, **kwargs)


def _merge(target: dict[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value
    return target


class JobManager:
    """Accepts jobs, runs them one at a time in submission order on a worker thread."""

    def __init__(self, store: JobStore, run_fn: RunFn | None = None, config: Config | None = None):
        self.store = store
        self.run_fn = run_fn or _default_run_fn
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
                raise ServiceError(404, "job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
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
    def submit(self, request: Mapping[str, Any]) -> str:
        """Validate a job request (already type-checked), copy its inputs, queue it; returns the id."""
        kind = request["kind"]
        prompt = (request.get("prompt") or "").strip()
        preset = request.get("preset") or "standard"
        overrides = dict(request.get("overrides") or {})
        if "server" in overrides:
            raise ServiceError(422, "invalid_config", "overrides cannot change the server section; set it when starting the backend")
        if preset not in PRESETS:
            raise ServiceError(422, "invalid_config", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            base = self.config.to_dict()
            base.pop("server")  # the server's own settings are not the job's (and port 0 is valid only there)
            base = _merge(base, PRESETS[preset])
            config = config_from_dict(_merge(base, overrides))
        except ConfigError as error:
            raise ServiceError(422, "invalid_config", f"overrides: {error}") from None

        uploads = {}
        for slot, wanted in (("image", "image"), ("views", "views")):
            upload_id = request.get(slot)
            if upload_id is None:
                continue
            meta = self.store.upload_meta(upload_id)
            if meta is None:
                raise ServiceError(422, "upload_not_found", f"{slot}: there is no upload {upload_id!r}; upload the file with POST /v1/uploads first")
            if meta["kind"] != wanted:
                expected = "a PNG or JPEG image" if wanted == "image" else "a zip of a views folder (transforms.json + images)"
                raise ServiceError(422, "wrong_upload_kind", f"{slot}: upload {upload_id} is a {meta['kind']} upload, but {slot} must be {expected}")
            uploads[slot] = meta
        if kind == "generate" and not prompt and "image" not in uploads:
            raise ServiceError(422, "invalid_request", "a generate job needs a prompt or an image")
        if kind in ("refine", "reconstruct") and "views" not in uploads:
            raise ServiceError(422, "invalid_request", f"a {kind} job needs views: upload a zip with transforms.json + images and pass its upload_id")
        if kind == "refine" and config.diffusion.enabled and not prompt:
            raise ServiceError(422, "invalid_request", "a refine job needs a prompt (or overrides {'diffusion': {'enabled': false}})")

        seed = request.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32)
        public = {
            "kind": kind,
            "prompt": request.get("prompt") or "",
            "negative_prompt": request.get("negative_prompt") or "",
            "image": request.get("image"),
            "views": request.get("views"),
            "seed": int(seed),
            "preset": preset,
            "overrides": overrides,
        }

        with self._lock:
            if self._stopping:
                raise ServiceError(503, "shutting_down", "the backend is shutting down; start it again and resubmit")
            busy = self._running is not None or bool(self._queue)
            if busy and len(self._queue) >= self.max_queue:
                raise ServiceError(503, "queue_full", f"{len(self._queue)} jobs are already waiting (server.max_queue); wait for one to finish or cancel one")
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
                raise ServiceError(503, "shutting_down", "the backend is shutting down; start it again and resubmit")
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._wakeup.notify_all()
        log.info("job %s queued (%s)", job_id, kind)
        return job_id

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.store.job_dir(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ServiceError(404, "job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
            if job.state == "queued":
                self._queue.remove(job_id)
                self._finish(job, "cancelled", message="cancelled before it started")
            elif job.state == "running":
                job.cancel_event.set()
                job.message = "cancelling..."
                job.version += 1
        return self.status(job_id)

    # -- worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                job = self._jobs[self._queue.popleft()]
                self._running = job.id
                job.state = "running"
                job.started = time.time()
                job.message = "starting"
                job.version += 1
            try:
                self._persist(job, force=True)
                self._run(job)
            except BaseException:  # never let the worker die: log and carry on with the next job
                log.exception("job worker error while running %s", job.id)
                with self._lock:
                    if job.state == "running":
                        self._finish(job, "failed", "internal_error", "unexpected error in the job worker; see the backend log")
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        job_dir = self.store.root / job.id
        request = dict(job.request)
        request["image"] = next((p for p in (job_dir / "inputs").glob("image.*")), None) if job.request["image"] else None
        request["views"] = (job_dir / "inputs" / "views") if job.request["views"] else None
        config = config_from_dict(job.config)

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
            artifacts = self.run_fn(request, job_dir, config, progress, cancel)
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
        except PipelineError as error:
            self._fail(job, error.code, error.message)
            return
        except ConfigError as error:
            self._fail(job, "invalid_config", str(error))
            return
        except OSError as error:
            if error.errno in STORAGE_ERRNOS:
                self._fail(job, "storage_error", storage_error(error, "write", job_dir).message)
            else:
                self._fail_unexpected(job, error)
            return
        except MemoryError:
            self._fail(job, "out_of_memory", "the job ran out of memory; try the fast preset or a smaller recon.image_size")
            return
        except Exception as error:  # noqa: BLE001 - every failure must end the job with a message
            if type(error).__name__ == "DatasetError":
                self._fail(job, "invalid_dataset", str(error))
            elif type(error).__name__ == "OutOfMemoryError":
                self._fail(job, "out_of_memory", "the GPU ran out of memory; try the fast preset, diffusion.cpu_offload or a smaller recon.image_size")
            else:
                self._fail_unexpected(job, error)
            return
        with self._lock:
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
        wanted = self.config.pipeline.device
        if wanted != "auto" or "torch" not in sys.modules:
            return wanted
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"

    def models_loaded(self) -> list[str]:
        pipeline = sys.modules.get("im3d.pipeline")
        getter = getattr(pipeline, "loaded_models", None)
        if getter is None:
            return []
        try:
            return sorted(str(m) for m in getter())
        except Exception:  # noqa: BLE001 - health must answer even if the pipeline misbehaves
            return []
