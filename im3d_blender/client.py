"""HTTP client of the IM-3D backend (wire protocol v1, docs/protocol.md). Standard library only, no bpy.

Every failure is a `BackendError` whose `code` and `message` the panel shows as they are:
the backend's own `{"error": {"code", "message"}}` when it answered, else a local code
(`backend_unreachable`, `timeout`, `bad_response`, `artifact_corrupt`, ...).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

PROTOCOL_VERSION = 1
PRESETS = ("fast", "standard", "high")
KINDS = ("generate", "refine", "reconstruct")
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")
REQUEST_FIELDS = ("kind", "prompt", "negative_prompt", "image", "views", "seed", "preset", "overrides")


class BackendError(RuntimeError):
    def __init__(self, code: str, message: str, http_status: int | None = None):
        self.code, self.message, self.http_status = code, message, http_status
        super().__init__(f"{message} [{code}]")


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, value: Any) -> "Artifact":
        try:
            name, size, digest = value["name"], int(value["size"]), str(value["sha256"]).lower()
        except (TypeError, KeyError, ValueError):
            raise BackendError("bad_response", f"the backend listed an artifact without name/size/sha256: {value!r}") from None
        if not _safe_name(name) or size < 0 or len(digest) != 64:
            raise BackendError("bad_response", f"the backend listed an invalid artifact {value!r}")
        return cls(name, size, digest)


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def verify_artifact(data: bytes, artifact: Artifact) -> None:
    """Raise `artifact_corrupt` unless `data` has exactly the size and sha256 the manifest lists."""
    if len(data) != artifact.size:
        raise BackendError(
            "artifact_corrupt", f"{artifact.name} is {len(data)} bytes but the job's manifest says {artifact.size}; the download is incomplete or corrupt"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != artifact.sha256:
        raise BackendError("artifact_corrupt", f"{artifact.name} does not match the sha256 in the job's manifest; the download is corrupt")


def build_job_request(
    kind: str,
    *,
    prompt: str = "",
    negative_prompt: str = "",
    image: str | None = None,
    views: str | None = None,
    seed: int | None = None,
    preset: str = "standard",
    overrides: dict | None = None,
) -> dict:
    """A `POST /v1/jobs` body, checked locally so obvious mistakes never reach the network."""
    if kind not in KINDS:
        raise BackendError("invalid_request", f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    if preset not in PRESETS:
        raise BackendError("invalid_request", f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if kind == "generate" and not prompt.strip() and not image:
        raise BackendError("invalid_request", "type a prompt or choose an image to generate from")
    if kind in ("refine", "reconstruct") and not views:
        raise BackendError("invalid_request", f"a {kind} job needs rendered views of the object")
    return {
        "kind": kind,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "image": image,
        "views": views,
        "seed": seed,
        "preset": preset,
        "overrides": overrides or {},
    }


class BackendClient:
    """One backend: `base_url` like http://127.0.0.1:8765 and its bearer token."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0):
        parsed = urllib.parse.urlsplit(base_url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BackendError("bad_url", f"backend URL {base_url!r} must look like http://127.0.0.1:8765")
        self.base_url = f"{parsed.scheme}://{parsed.netloc}"
        self.token = token
        self.timeout = timeout
        # Never through a system proxy: the backend is local (or a URL the user typed on purpose).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:  # the token stays out of logs and tracebacks
        return f"BackendClient({self.base_url!r})"

    # -- transport
    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
        headers: dict | None = None, timeout: float | None = None,
    ) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if content_type:
            request.add_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            payload = error.read()
            raise _error_from_response(error.code, payload) from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise BackendError("timeout", f"the backend at {self.base_url} did not answer within {timeout or self.timeout:.0f} s") from None
            raise BackendError(
                "backend_unreachable",
                f"cannot reach the backend at {self.base_url} ({reason}); start it in the add-on's preferences or check the URL",
            ) from None
        except (socket.timeout, TimeoutError):
            raise BackendError("timeout", f"the backend at {self.base_url} did not answer within {timeout or self.timeout:.0f} s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as error:
            raise BackendError("backend_unreachable", f"the connection to the backend at {self.base_url} broke ({error}); is it still running?") from None

    def json(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        _, _, data = self.request(method, path, body, "application/json" if body is not None else None, timeout=timeout)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BackendError("bad_response", f"the backend at {self.base_url} answered {path} with something that is not JSON; is it an IM-3D backend?") from None

    # -- API
    def health(self, timeout: float = 3.0) -> dict:
        health = self.json("GET", "/v1/health", timeout=timeout)
        if not isinstance(health, dict) or health.get("protocol") != PROTOCOL_VERSION:
            raise BackendError(
                "protocol_mismatch",
                f"the backend speaks protocol {health.get('protocol') if isinstance(health, dict) else '?'} but this add-on speaks {PROTOCOL_VERSION}; update the add-on or the backend",
            )
        return health

    def upload(self, data: bytes, content_type: str, filename: str | None = None) -> str:
        headers = {"X-Filename": filename} if filename else None
        _, _, body = self.request("POST", "/v1/uploads", data, content_type, headers=headers, timeout=max(self.timeout, 60.0))
        try:
            return str(json.loads(body)["upload_id"])
        except (ValueError, KeyError, TypeError):
            raise BackendError("bad_response", "the backend's upload answer has no upload_id") from None

    def upload_file(self, path: str | os.PathLike) -> str:
        path = Path(path)
        content_type = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".zip": "application/zip"}.get(path.suffix.lower())
        if content_type is None:
            raise BackendError("invalid_request", f"{path.name}: only PNG, JPEG images or a zip of views can be uploaded")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BackendError("file_unreadable", f"cannot read {path}: {error.strerror}") from None
        return self.upload(data, content_type, path.name)

    def create_job(self, request: dict) -> str:
        unknown = set(request) - set(REQUEST_FIELDS)
        if unknown:
            raise BackendError("invalid_request", f"unknown job field(s) {sorted(unknown)}")
        answer = self.json("POST", "/v1/jobs", request)
        if not isinstance(answer, dict) or "id" not in answer:
            raise BackendError("bad_response", "the backend's job answer has no id")
        return str(answer["id"])

    def job(self, job_id: str) -> dict:
        return self._status(self.json("GET", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}"))

    def jobs(self) -> list[dict]:
        answer = self.json("GET", "/v1/jobs")
        return [self._status(s) for s in answer.get("jobs", [])] if isinstance(answer, dict) else []

    def cancel(self, job_id: str) -> dict:
        return self._status(self.json("POST", f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/cancel", timeout=5.0))

    def artifact(self, job_id: str, name: str) -> bytes:
        if not _safe_name(name):
            raise BackendError("invalid_request", f"bad artifact name {name!r}")
        path = f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/artifacts/{urllib.parse.quote(name, safe='')}"
        return self.request("GET", path, timeout=max(self.timeout, 120.0))[2]

    def preview(self, job_id: str, name: str) -> bytes:
        path = f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/previews/{urllib.parse.quote(name, safe='')}"
        return self.request("GET", path)[2]

    def download_artifacts(self, status: dict, dest: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Path]:
        """Download a succeeded job's artifacts into `dest`, each checked against the status's manifest.

        Only names the manifest lists are fetched; a missing name, a wrong size or a wrong sha256
        raises `artifact_corrupt` and leaves no file of this call behind.
        """
        if status.get("state") != "succeeded":
            raise BackendError("job_not_finished", f"job {status.get('id')} is {status.get('state')}, not succeeded; it has no result to import")
        listed = {a.name: a for a in (Artifact.from_json(v) for v in status.get("artifacts") or [])}
        wanted = list(names) if names is not None else list(listed)
        missing = [n for n in wanted if n not in listed]
        if missing:
            raise BackendError("artifact_corrupt", f"the job's manifest does not list {', '.join(missing)}; the result is incomplete")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        try:
            for name in wanted:
                data = self.artifact(status["id"], name)
                verify_artifact(data, listed[name])
                path = dest / name
                temporary = path.with_name(path.name + ".part")
                temporary.write_bytes(data)
                os.replace(temporary, path)
                written[name] = path
        except BaseException:
            for path in written.values():
                path.unlink(missing_ok=True)
            raise
        (dest / "manifest.json").write_text(
            json.dumps({"job": status["id"], "artifacts": [vars(listed[n]) for n in wanted]}, indent=2), encoding="utf-8"
        )
        return written

    @staticmethod
    def _status(value: Any) -> dict:
        if not isinstance(value, dict) or "id" not in value or "state" not in value:
            raise BackendError("bad_response", "the backend returned a job status without id/state")
        return value


def verify_downloaded(folder: str | os.PathLike) -> dict[str, Path]:
    """Re-check files kept from an earlier download against the manifest saved beside them."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        artifacts = [Artifact.from_json(v) for v in manifest["artifacts"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise BackendError("artifact_corrupt", f"{folder} has no readable manifest.json; re-run the job") from None
    files = {}
    for artifact in artifacts:
        try:
            data = (folder / artifact.name).read_bytes()
        except OSError:
            raise BackendError("artifact_corrupt", f"{artifact.name} is missing from {folder}; re-run the job") from None
        verify_artifact(data, artifact)
        files[artifact.name] = folder / artifact.name
    return files


def _error_from_response(http_status: int, payload: bytes) -> BackendError:
    try:
        error = json.loads(payload.decode("utf-8"))["error"]
        return BackendError(str(error["code"]), str(error["message"]), http_status)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        text = payload[:200].decode("utf-8", "replace").strip()
        return BackendError("http_error", f"the backend answered HTTP {http_status}{': ' + text if text else ''}", http_status)
