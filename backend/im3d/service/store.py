"""The job store on disk: one folder per job (job.json, inputs/, previews/, artifacts, manifest.json).

`job.json` is rewritten atomically at every state change; `manifest.json` (artifact names, sizes,
sha256) is written last, so a job that died half-way has no manifest and is reported `interrupted`
at the next start, never `succeeded`. Uploads live under `_uploads/` until a job copies them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from im3d import __version__
from im3d.config import ServerConfig
from im3d.errors import Im3dError, storage_error
from im3d.io_utils import atomic_write_json
from im3d.service.uploads import (
    UPLOAD_ID_RE,
    check_image_upload,
    check_views_dataset,
    extract_zip_safely,
    find_views_root,
    regular_file_inside,
    sha256_file,
)

log = logging.getLogger("im3d.jobs")

KINDS = ("generate", "refine", "reconstruct")
STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
JOB_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # one path component, no '..' prefix
RESERVED_NAMES = frozenset({"job.json", "manifest.json", "inputs", "previews", "error.log"})
UPLOADS_DIR = "_uploads"
UPLOAD_MAX_AGE_S = 7 * 24 * 3600



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
    def from_record(cls, data: Any) -> "Job":
        """A job from its job.json; anything malformed raises (pydantic ValidationError)."""
        record = JobRecord.model_validate(data)
        job = cls(id=record.id, kind=record.kind, request=record.request, config=record.config)
        job.state, job.stage, job.progress, job.message = record.state, record.stage, record.progress, record.message
        job.error = record.error.model_dump() if record.error else None
        job.created, job.started, job.finished = record.created, record.started, record.finished
        job.previews = [p for p in record.previews if FILE_NAME_RE.match(p)]
        job.stages = record.stages
        return job


class ErrorRecord(BaseModel):
    code: str
    message: str


class JobRecord(BaseModel):
    """What a job.json must hold to be served; checked on load so one bad file affects one job."""

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    stage: str = ""
    progress: float = Field(0.0, ge=0.0, le=1.0)
    message: str = ""
    error: ErrorRecord | None = None
    created: float = Field(0.0, allow_inf_nan=False)
    started: float | None = Field(None, allow_inf_nan=False)
    finished: float | None = Field(None, allow_inf_nan=False)
    previews: list[str] = Field(default_factory=list)
    stages: list[dict[str, Any]] = Field(default_factory=list)
    request: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


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
            raise Im3dError("job_not_found", f"there is no job {job_id!r}; list jobs with GET /v1/jobs")
        return self.root / job_id

    def write_job(self, job: Job, record: dict[str, Any]) -> None:
        atomic_write_json(self.root / job.id / "job.json", record)

    def load_jobs(self) -> list[Job]:
        """Every job folder's job; a folder whose job.json is unreadable or malformed becomes a
        `failed` job (`corrupt_job_record`), its bad file kept beside as job.json.corrupt."""
        jobs = []
        if not self.root.is_dir():
            return jobs
        for path in sorted(self.root.iterdir()):
            if not JOB_ID_RE.match(path.name) or not path.is_dir():
                continue
            record_path = path / "job.json"
            try:
                job = Job.from_record(json.loads(record_path.read_bytes()))
                if job.id != path.name:
                    raise ValueError(f"it names job {job.id!r}, not {path.name!r}")
            except FileNotFoundError:
                job = self._quarantine(path, "it has no job.json")
            except (OSError, ValueError, ValidationError) as error:  # JSONDecodeError and ValidationError are ValueErrors
                job = self._quarantine(path, f"its job.json is unreadable or malformed ({str(error).splitlines()[0][:200]})")
            jobs.append(job)
        return jobs

    def _quarantine(self, path: Path, reason: str) -> Job:
        log.warning("job folder %s: %s; listed as failed", path, reason)
        job = Job(id=path.name, kind="unknown", request={}, config={})
        job.state, job.created, job.finished = "failed", path.stat().st_mtime, time.time()
        job.message = f"this job's record cannot be read: {reason}; the folder is kept as it was, delete it or run the job again"
        job.error = {"code": "corrupt_job_record", "message": job.message}
        try:
            if (path / "job.json").exists():
                os.replace(path / "job.json", path / "job.json.corrupt")
            (path / "manifest.json").unlink(missing_ok=True)  # nothing of it is served as a result
            self.write_job(job, job.record())
        except OSError as error:
            log.error("could not quarantine %s: %s", path, error)
        return job

    def write_manifest(self, job_id: str, artifacts: Mapping[str, Path | str]) -> list[dict[str, Any]]:
        """Hash every artifact and write `manifest.json` last; refuse names or paths that could escape."""
        job_dir = (self.root / job_id).resolve()
        entries = []
        for name, path in sorted(artifacts.items()):
            if not isinstance(name, str) or not FILE_NAME_RE.match(name) or name in RESERVED_NAMES:
                raise Im3dError("internal_error", f"the pipeline returned an invalid artifact name {name!r}")
            path = Path(path)
            if not path.is_absolute():
                path = job_dir / path
            try:
                relative = path.absolute().relative_to(job_dir).as_posix()
            except ValueError:
                raise Im3dError("internal_error", f"artifact {name} ({path}) is outside the job folder") from None
            if regular_file_inside(job_dir, relative) is None:
                raise Im3dError("internal_error", f"artifact {name} ({path}) is missing, a symlink or not a regular file")
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
        self, upload_id: str, staging: Path, content_type: str, kind: str, size: int, digest: str, filename: str, max_unpacked: int, limits=None
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
            if kind == "image":
                meta["width"], meta["height"] = check_image_upload(staging / "data", limits or ServerConfig())
            if kind == "views":
                extract_zip_safely(staging / "data", staging / "views", max_unpacked)
                root = find_views_root(staging / "views")
                meta["frames"] = check_views_dataset(root, limits)
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

