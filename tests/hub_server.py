"""A local stand-in for the Hugging Face Hub's file API and torchvision's download server.

It speaks what `huggingface_hub` uses to download (set `HF_ENDPOINT` to `server.url`):

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: model info with `sha`,
  `siblings` (`rfilename`, `size`, `lfs`), `gated`, `cardData.license`;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (the sha256, as for LFS
  files), `Content-Length`, `Accept-Ranges`; `Range: bytes=N-` answers 206 + `Content-Range`;
- a gated repository answers its files with 403 + `X-Error-Code: GatedRepo` unless the request
  carries the accepted token; a wrong token gets 401;
- plain files under `/files/{name}` (with Range), for the LPIPS backbone download.

`cut_once` names files whose first GET sends half the bytes and then drops the connection.
`slow` paces file bodies so that a test can watch progress and cancel. Every request is logged in `requests` (method, path, Range, whether a token came) for asserts.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

from im3d.testing.fake_http import JsonHandler


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    license: str = "test-licence"
    sha: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)  # /files/{name}
    token: str = "hf_accepted_token"  # the token of an account that accepted gated licences
    cut_once: set[str] = field(default_factory=set)  # file paths (repo file or plain name) to cut on first GET
    requests: list[dict] = field(default_factory=list)
    slow: float = 0.0  # seconds to wait after each 16 KiB of a file body (cancel and progress tests)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(JsonHandler):
        protocol_version = "HTTP/1.1"

        def _log(self) -> None:
            auth = self.headers.get("Authorization", "")
            with state.lock:
                state.requests.append({"method": self.command, "path": unquote(urlparse(self.path).path),
                                       "range": self.headers.get("Range"), "token": auth.removeprefix("Bearer ") or None})

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self.send_json(status, {"error": message}, headers)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            self._log()
            path = unquote(urlparse(self.path).path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._model_info("/".join(parts[2:4]))
            if parts[0] == "files" and len(parts) == 2:
                data = state.plain.get(parts[1])
                if data is None:
                    return self._error(404, "EntryNotFound", "no such file")
                return self._send_bytes(parts[1], data, {})
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, file_path = "/".join(parts[:2]), "/".join(parts[4:])
                repo = state.repos.get(repo_id)
                if repo is None:
                    return self._error(401, "RepoNotFound", "Repository not found")
                token = self.headers.get("Authorization", "").removeprefix("Bearer ") or None
                if repo.gated and token != state.token:
                    if token is not None:
                        return self._error(401, None, "Invalid credentials in Authorization header")
                    return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.")
                data = repo.files.get(file_path)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{file_path} does not exist")
                digest = hashlib.sha256(data).hexdigest()
                return self._send_bytes(f"{repo_id}/{file_path}", data, {"X-Repo-Commit": repo.sha, "ETag": f'"{digest}"'})
            self._error(404, None, "not found")

        def _model_info(self, repo_id: str) -> None:
            repo = state.repos.get(repo_id)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found")
            siblings = [
                {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                 "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                for name, data in sorted(repo.files.items())
            ]
            self.send_json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                             "gated": "manual" if repo.gated else False, "cardData": {"license": repo.license},
                             "siblings": siblings, "tags": []})

        def _send_bytes(self, key: str, data: bytes, headers: dict) -> None:
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                start = int(ranged[6:].split("-")[0] or 0)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            with state.lock:
                cut = key in state.cut_once and not ranged
                if cut:
                    state.cut_once.discard(key)
            if cut:  # half the bytes, then the connection drops, as a flaky network would
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass
                return
            if state.slow <= 0:
                self.wfile.write(body)
                return
            import time

            for start in range(0, len(body), 16384):
                try:
                    self.wfile.write(body[start : start + 16384])
                    self.wfile.flush()
                except OSError:  # the client went away (cancelled)
                    return
                time.sleep(state.slow)

    return Handler


class HubServer:
    """`with HubServer(state) as hub:` serves on 127.0.0.1 (an ephemeral port) until the block ends."""

    def __init__(self, state: HubState):
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def gets(self, suffix: str) -> list[dict]:
        """The GET requests whose path ends with `suffix`."""
        with self.state.lock:
            return [r for r in self.state.requests if r["method"] == "GET" and r["path"].endswith(suffix)]


def tiny_diffusers_repo(weight_bytes: int = 200_000) -> dict[str, bytes]:
    """A diffusers-layout repository with the clutter a real one has (single-file checkpoints, pickles)."""
    import numpy as np
    from safetensors.numpy import save

    # real safetensors files (one uint8 tensor each), so `im3d models verify` can read their headers
    def blob_of(n: int) -> bytes:
        return save({"weight": np.frombuffer(bytes(range(256)) * max(n // 256, 1), dtype=np.uint8)})

    blob = blob_of(weight_bytes)
    return {
        "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                         "scheduler": ["diffusers", "EulerDiscreteScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
                                         "safety_checker": [None, None]}).encode(),
        "README.md": b"# tiny",
        "single_file_checkpoint.safetensors": blob_of(3 * weight_bytes),  # never loaded by the project
        "unet/config.json": b'{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": blob_of(2 * weight_bytes),  # fp32: skipped, the fp16 variant exists
        "unet/diffusion_pytorch_model.fp16.safetensors": blob,
        "unet/diffusion_pytorch_model.bin": blob,  # pickle: never fetched
        "scheduler/scheduler_config.json": b'{"num_train_timesteps": 1000}',
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges.txt": b"#version: 0.2\n",
    }


ALLOWED_TINY_FILES = {
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
}
