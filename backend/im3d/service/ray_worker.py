"""The worker actor of the `ray` executor: one process on a GPU node that runs one job at a time.

It lives as long as the pool, so the pipeline's model cache (per process, `im3d.diffusion.models`)
stays warm between jobs. Nothing is shared with the API node but Ray's object store: a job's input
files arrive as bytes and are written into a scratch folder on this node; the artifacts go back as
bytes with their sha256, and the scratch folder is removed. Progress and previews are picked up by
the API node's `poll()`; `cancel()` sets the flag the pipeline checks between steps. The actor is
threaded (max_concurrency > 1) so that poll and cancel answer while `run` is busy.

This module does not import Ray: `ray_executor` wraps `JobWorker` with `ray.remote` and options.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from im3d.errors import Cancelled, Im3dError, as_im3d_error

RunFn = Callable[..., Mapping[str, Path]]


def safe_relative(path: str) -> PurePosixPath:
    """A relative POSIX path without '..' or absolute parts (the bytes of a job travel by name)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts or any(part in ("", ".", "..") for part in pure.parts) or "\\" in path:
        raise Im3dError("internal_error", f"refusing the unsafe file path {path!r} in a job transfer")
    return pure


def read_tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder` as {relative posix path: bytes} (symlinks are skipped)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def _default_run_fn(inputs, workdir, config, progress, cancel):
    from im3d.pipeline import run_job  # heavy: imported in the worker process, once, on its first job
    from im3d.weights import preflight

    preflight(config, {"kind": inputs.kind, "image": inputs.image})  # this node's models, in ms
    return run_job(inputs, workdir, config, progress, cancel)


class _Attempt:
    """What the API node has not yet picked up of one running attempt."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.events: list[tuple[str, float, str, str | None]] = []
        self.previews: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def take(self) -> dict[str, Any]:
        with self.lock:
            taken = {"events": self.events, "previews": self.previews}
            self.events, self.previews = [], {}
        return taken


class JobWorker:
    def __init__(self, name: str, run_fn: RunFn | None = None, device: str = "auto"):
        self.name = name
        self.run_fn = run_fn or _default_run_fn
        self.device = device
        self.jobs_done = 0
        self._attempts: dict[str, _Attempt] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """Where this worker is and what it holds warm (for GET /v1/health)."""
        from im3d.device import describe_device

        models = sys.modules.get("im3d.diffusion.models")
        try:
            loaded = [str(m) for m in models.loaded_models()] if models is not None else []
        except Exception:  # noqa: BLE001 - health must answer even if the model cache misbehaves
            loaded = []
        gpus: list[str] = []
        try:
            import ray

            gpus = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        except Exception:  # noqa: BLE001 - outside an actor (unit use) there is no runtime context
            pass
        with self._lock:
            running = next(iter(self._attempts), None)
        return {
            "name": self.name,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "device": describe_device(self.device),
            "gpus": gpus,
            "models_loaded": loaded,
            "running_job": running,
            "jobs_done": self.jobs_done,
        }

    def run(self, job_id: str, inputs: Mapping[str, Any], files: Mapping[str, bytes], config: Mapping[str, Any]) -> dict[str, Any]:
        """Run one job attempt; always returns {outcome: succeeded | cancelled | failed, ...}."""
        from im3d.config import config_from_dict
        from im3d.request import JobInputs

        attempt = _Attempt()
        with self._lock:
            self._attempts[job_id] = attempt
        scratch = Path(tempfile.mkdtemp(prefix=f"im3d-{job_id}-"))
        try:
            for relative, data in files.items():
                target = scratch.joinpath(*safe_relative(relative).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            (scratch / "previews").mkdir(exist_ok=True)
            job_inputs = JobInputs(
                kind=inputs["kind"],
                prompt=inputs.get("prompt") or "",
                negative_prompt=inputs.get("negative_prompt") or "",
                image=scratch / inputs["image"] if inputs.get("image") else None,
                views=scratch / inputs["views"] if inputs.get("views") else None,
            )

            def progress(stage: str, fraction: float, message: str = "", preview: Path | str | None = None) -> None:
                name = None
                if preview is not None:
                    preview_path = Path(preview)
                    name = preview_path.name
                    try:
                        data = preview_path.read_bytes()
                    except OSError:
                        name = None
                with attempt.lock:
                    attempt.events.append((str(stage), float(fraction), str(message), name))
                    if name is not None:
                        attempt.previews[name] = data

            artifacts = self.run_fn(job_inputs, scratch, config_from_dict(config), progress, attempt.cancel.is_set)
            if attempt.cancel.is_set():
                raise Cancelled()
            result = {"outcome": "succeeded", "artifacts": self._collect(scratch, artifacts or {})}
            self.jobs_done += 1
        except Cancelled:
            result = {"outcome": "cancelled"}
        except Exception as error:  # noqa: BLE001 - every failure goes back to the API node as a code and a message
            known = as_im3d_error(error, scratch)
            if known is None:
                result = {
                    "outcome": "failed",
                    "code": "internal_error",
                    "message": f"unexpected error on worker {self.name}: {type(error).__name__}: {error}; see error.log in the job folder",
                    "traceback": "".join(traceback.format_exception(error)),
                }
            else:
                result = {"outcome": "failed", "code": known.code, "message": known.message}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            with self._lock:
                self._attempts.pop(job_id, None)
        result.update(attempt.take())  # progress the last poll did not see
        return result

    @staticmethod
    def _collect(scratch: Path, artifacts: Mapping[str, Path | str]) -> list[dict[str, Any]]:
        collected = []
        root = scratch.resolve()
        for name, path in sorted(artifacts.items()):
            path = Path(path)
            if not path.is_absolute():
                path = scratch / path
            try:
                relative = path.resolve().relative_to(root).as_posix()
            except ValueError:
                raise Im3dError("internal_error", f"artifact {name} ({path}) is outside the job folder") from None
            if path.is_symlink() or not path.is_file():
                raise Im3dError("internal_error", f"artifact {name} ({path}) is missing, a symlink or not a regular file")
            data = path.read_bytes()
            collected.append({"name": name, "path": relative, "data": data, "sha256": hashlib.sha256(data).hexdigest()})
        return collected

    def poll(self, job_id: str) -> dict[str, Any]:
        """Progress events and preview bytes since the last poll (empty when the job is not here)."""
        with self._lock:
            attempt = self._attempts.get(job_id)
        return attempt.take() if attempt is not None else {"events": [], "previews": {}}

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            attempt = self._attempts.get(job_id)
        if attempt is None:
            return False
        attempt.cancel.set()
        return True

    def pid(self) -> int:
        return os.getpid()
