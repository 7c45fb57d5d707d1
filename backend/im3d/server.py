"""The v1 HTTP API of the backend (docs/protocol.md): FastAPI app + uvicorn on 127.0.0.1.

Start-up stays fast because nothing here imports torch: the job worker imports the pipeline on
the first job and keeps its models warm for the life of the process.

    python -m im3d.server --jobs-dir D --port P --token-file F      # or: im3d serve
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import json
import logging
import os
import secrets
import socket
import stat
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from im3d import PROTOCOL_VERSION, __version__
from im3d.config import Config, ConfigError
from im3d.jobs import JobManager, JobStore, RunFn, ServiceError, detect_upload_kind, storage_error

log = logging.getLogger("im3d.server")

READY_PREFIX = "IM3D-READY"
MAX_JSON_BYTES = 1 << 20
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
UPLOAD_TYPES = ("image/png", "image/jpeg", "application/zip")
ARTIFACT_TYPES = {".glb": "model/gltf-binary", ".png": "image/png", ".json": "application/json", ".ply": "application/octet-stream"}
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"


# ---------------------------------------------------------------------------------------------
# Schemas (they also make the OpenAPI document)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["generate", "refine", "reconstruct"]
    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    image: str | None = Field(None, pattern=UPLOAD_ID_PATTERN, description="upload_id of a PNG/JPEG upload")
    views: str | None = Field(None, pattern=UPLOAD_ID_PATTERN, description="upload_id of a views zip upload")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    preset: Literal["fast", "standard", "high"] = "standard"
    overrides: dict[Literal["diffusion", "recon", "mesh", "pipeline", "server"], dict[str, Any]] = Field(
        default_factory=dict, description="{section: {key: value}} applied on top of the preset"
    )


class JobCreated(BaseModel):
    id: str


class Artifact(BaseModel):
    name: str
    size: int
    sha256: str


class JobStatus(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    stage: str
    progress: float = Field(ge=0.0, le=1.0)
    message: str
    eta_s: float | None
    error: ErrorDetail | None
    artifacts: list[Artifact]
    previews: list[str]
    created: float
    started: float | None
    finished: float | None
    request: dict[str, Any]


class JobList(BaseModel):
    jobs: list[JobStatus]


class Health(BaseModel):
    version: str
    protocol: int
    device: str
    models_loaded: list[str]
    queue_length: int
    running_job: str | None


class UploadResult(BaseModel):
    upload_id: str
    size: int
    sha256: str
    kind: Literal["image", "views"]


# ---------------------------------------------------------------------------------------------
# Middleware: Host allow-list, bearer token, JSON body cap (pure ASGI: runs before any body parsing)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def host_is_loopback(host: str) -> bool:
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in LOOPBACK_HOSTS


class GuardMiddleware:
    def __init__(self, app, token: str, allow_remote: bool):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.allow_remote = allow_remote

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allow_remote and not host_is_loopback(host):
            await error_response(403, "forbidden_host", f"requests must address the backend as 127.0.0.1 or localhost, not {host[:100]!r}; enable server.allow_remote for remote access")(scope, receive, send)
            return
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if not hmac.compare_digest(b"Bearer " + token.strip(), self.expected) or scheme.lower() != b"bearer":
            reason = "missing" if not given else "wrong"
            await error_response(
                401, "unauthorized", f"the bearer token is {reason}; send 'Authorization: Bearer <token>' with the token from the backend's token file",
                headers={"WWW-Authenticate": "Bearer"},
            )(scope, receive, send)
            return
        if scope["path"] != "/v1/uploads" and scope["method"] in ("POST", "PUT", "PATCH"):
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type and content_type != b"application/json" and not content_type.endswith(b"+json"):
                await error_response(
                    415, "unsupported_media_type", f"this route takes JSON; send Content-Type: application/json, not {content_type.decode('latin-1')[:60]!r}"
                )(scope, receive, send)
                return
            receive = await self._capped_body(scope, receive, send, headers)
            if receive is None:
                return
            if not content_type:  # a body without Content-Type is read as JSON
                scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
        await self.app(scope, receive, send)

    async def _capped_body(self, scope, receive, send, headers):
        """Read a JSON body up to MAX_JSON_BYTES and replay it; a 413 past that."""
        too_large = error_response(413, "request_too_large", f"request bodies are limited to {MAX_JSON_BYTES // 1024} KiB")
        try:
            if int(headers.get(b"content-length", b"0")) > MAX_JSON_BYTES:
                await too_large(scope, receive, send)
                return None
        except ValueError:
            await error_response(400, "invalid_request", "the Content-Length header is not a number")(scope, receive, send)
            return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > MAX_JSON_BYTES:
                await too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# ---------------------------------------------------------------------------------------------
# Error handlers: every error is {"error": {"code", "message"}}

REQUEST_FIELDS = ", ".join(JobRequest.model_fields)


def describe_validation_error(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    where = ".".join(loc)
    if error.get("type") == "extra_forbidden":
        field = ".".join(loc[1:]) if loc and loc[0] == "body" else where
        return f"unknown field '{field}'; allowed fields are: {REQUEST_FIELDS}"
    if error.get("type") == "missing":
        return f"{where}: this field is required"
    return f"{where}: {error.get('msg', 'invalid value')}"


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            detail = ctx.get("error", "")
            return error_response(400, "invalid_json", f"the request body is not valid JSON ({detail}); send one JSON object")
    text = "; ".join(describe_validation_error(e) for e in errors[:5])
    if len(errors) > 5:
        text += f"; and {len(errors) - 5} more"
    return error_response(422, "invalid_request", text or "the request is invalid")


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "request_too_large", 415: "unsupported_media_type"}


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 400 and request.url.path != "/v1/uploads":
        # FastAPI's own body-parsing failure (e.g. bytes that are not UTF-8 JSON)
        return error_response(400, "invalid_json", f"the request body could not be read as JSON ({exc.detail}); send one UTF-8 JSON object")
    if exc.status_code == 404:
        message = f"there is no route {request.method} {request.url.path}; see /v1/openapi.json"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /v1/openapi.json"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message)


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"unexpected error ({type(exc).__name__}); see the backend log")


# ---------------------------------------------------------------------------------------------
# The app

ERROR_STATUSES = {
    "400": "Malformed body or upload (invalid_json, invalid_upload)",
    "401": "Missing or wrong bearer token (unauthorized)",
    "403": "Host is not loopback (forbidden_host)",
    "404": "Not found",
    "405": "Method not allowed",
    "413": "Body too large",
    "415": "Unsupported media type",
    "422": "Invalid request (invalid_request, invalid_config, upload_not_found, wrong_upload_kind)",
    "503": "Queue full or shutting down",
    "507": "Jobs folder not writable or full (storage_error)",
}


def create_app(config: Config, token: str, run_fn: RunFn | None = None, jobs_dir: str | Path | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the job worker (with crash recovery) and stops it."""
    store = JobStore(jobs_dir or resolve_jobs_dir(config))
    manager = JobManager(store, run_fn=run_fn, config=config)
    max_upload = config.server.max_upload_mb * (1 << 20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(manager.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(manager.shutdown)

    app = FastAPI(
        title="IM-3D backend",
        version=__version__,
        description="Text/image to textured 3D mesh (IM-3D). Wire protocol v1: see docs/protocol.md.",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.store = store
    app.add_middleware(GuardMiddleware, token=token, allow_remote=config.server.allow_remote)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(Exception, on_unexpected_error)

    @app.get("/v1/health", response_model=Health)
    def health() -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "device": manager.device(),
            "models_loaded": manager.models_loaded(),
            "queue_length": manager.queue_length,
            "running_job": manager.running_job,
        }

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in UPLOAD_TYPES},
        }
    }

    @app.post("/v1/uploads", status_code=201, response_model=UploadResult, openapi_extra=upload_body)
    async def upload(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in UPLOAD_TYPES:
            detect_upload_kind(content_type, b"")  # raises the 415
        too_large = ServiceError(413, "upload_too_large", f"uploads are limited to {config.server.max_upload_mb} MiB (server.max_upload_mb); send a smaller file")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ServiceError(400, "invalid_request", "the Content-Length header is not a number")
            if int(length) > max_upload:
                raise too_large
        upload_id, staging = await anyio.to_thread.run_sync(store.new_upload_dir)
        try:
            digest, size, head = hashlib.sha256(), 0, b""
            try:
                handle = await anyio.to_thread.run_sync(open, staging / "data", "wb")
            except OSError as error:
                raise storage_error(error, "store the upload in") from None
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload:
                        raise too_large
                    if len(head) < 16:
                        head += chunk[:16]
                    digest.update(chunk)
                    await anyio.to_thread.run_sync(handle.write, chunk)
                await anyio.to_thread.run_sync(handle.close)
            except OSError as error:
                raise storage_error(error, "store the upload in") from None
            finally:
                handle.close()
            if size == 0:
                raise ServiceError(400, "invalid_upload", "the upload is empty; send the file's bytes as the request body")
            kind = detect_upload_kind(content_type, head)
            filename = request.headers.get("x-filename", "")
            meta = await anyio.to_thread.run_sync(
                store.finish_upload, upload_id, staging, content_type, kind, size, digest.hexdigest(), filename, 4 * max_upload
            )
        except BaseException:
            await anyio.to_thread.run_sync(store.discard, staging)
            raise
        log.info("upload %s stored (%s, %d bytes)", upload_id, kind, size)
        return {"upload_id": upload_id, "size": meta["size"], "sha256": meta["sha256"], "kind": kind}

    @app.post("/v1/jobs", status_code=201, response_model=JobCreated)
    def create_job(body: JobRequest) -> dict[str, str]:
        return {"id": manager.submit(body.model_dump())}

    @app.get("/v1/jobs", response_model=JobList)
    def list_jobs() -> dict[str, Any]:
        return {"jobs": manager.list_statuses()}

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    def job_status(job_id: str) -> dict[str, Any]:
        return manager.status(job_id)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus)
    def cancel_job(job_id: str) -> dict[str, Any]:
        return manager.cancel(job_id)

    binary = {"200": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.get("/v1/jobs/{job_id}/artifacts/{name}", response_class=FileResponse, responses=binary)
    def artifact(job_id: str, name: str) -> FileResponse:
        status = manager.status(job_id)
        path = store.artifact_path(job_id, name) if status["state"] == "succeeded" else None
        if path is None:
            raise ServiceError(404, "artifact_not_found", f"job {job_id} has no artifact {name[:100]!r}; use a name listed in its status 'artifacts'")
        return FileResponse(path, media_type=ARTIFACT_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    png = {"200": {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.get("/v1/jobs/{job_id}/previews/{name}", response_class=FileResponse, responses=png)
    def preview(job_id: str, name: str) -> FileResponse:
        manager.status(job_id)
        path = store.preview_path(job_id, name)
        if path is None:
            raise ServiceError(404, "preview_not_found", f"job {job_id} has no preview {name[:100]!r}; use a name listed in its status 'previews'")
        return FileResponse(path, media_type="image/png")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas["ErrorDetail"] = schemas["ErrorResponse"].pop("$defs", {}).get("ErrorDetail", ErrorDetail.model_json_schema())
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path_item in schema["paths"].values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                for status, description in ERROR_STATUSES.items():
                    responses[status] = {"description": description, "content": error_content}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------------------------------------
# Files, token and serving


def user_data_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "im3d"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "im3d"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "im3d"


def resolve_jobs_dir(config: Config) -> Path:
    return Path(config.server.jobs_dir).expanduser() if config.server.jobs_dir else user_data_dir() / "jobs"


def resolve_token_file(config: Config) -> Path:
    if config.server.token_file:
        return Path(config.server.token_file).expanduser()
    return resolve_jobs_dir(config).absolute().parent / "token"


def load_or_create_token(path: Path) -> str:
    """Read the token, or create it (user-only file) when absent; never logs the token itself."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot create the token file {path}: {error.strerror}; set server.token_file to a writable path") from None
    else:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        log.info("created a new API token in %s", path)
    try:
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
            log.warning("token file %s was readable by others; made it user-only (0600)", path)
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the token file {path}: {error}; delete it to have a new one made") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"the token in {path} is too short or malformed; delete the file to have a new one made")
    return token


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name == "posix":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({error.strerror}); another backend may be running, or choose another server.port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: Config, ready: Callable[[str], None] | None = None, run_fn: RunFn | None = None) -> None:
    """Run the API until SIGINT/SIGTERM; `ready(url)` is called once it accepts connections.

    On shutdown the running job is cancelled and marked `interrupted`, queued ones too.
    """
    import uvicorn

    host = config.server.host
    if not config.server.allow_remote and not host_is_loopback(host):
        raise ConfigError(f"server.host {host!r} is not a loopback address; set server.allow_remote = true to listen on it")
    jobs_dir = resolve_jobs_dir(config)
    JobStore(jobs_dir).prepare()  # a clear storage_error now rather than a failed lifespan later
    token = load_or_create_token(resolve_token_file(config))
    app = create_app(config, token, run_fn=run_fn, jobs_dir=jobs_dir)
    sock = bind_socket(host, config.server.port)
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                log.info("IM-3D backend %s listening on %s (jobs in %s)", __version__, url, jobs_dir)
                if ready is not None:
                    ready(url)

    uvicorn_config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=30
    )
    try:
        Server(uvicorn_config).run(sockets=[sock])
    finally:
        sock.close()


def print_ready(url: str) -> None:
    print(f"{READY_PREFIX} {url}", flush=True)


def load_run_fn(spec: str) -> RunFn:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--runner {spec!r} must look like module:function")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m im3d.server", description="Run the IM-3D backend HTTP API.")
    parser.add_argument("--jobs-dir", help="folder for job folders (server.jobs_dir)")
    parser.add_argument("--port", type=int, help="TCP port; 0 picks a free one (server.port)")
    parser.add_argument("--token-file", help="bearer token file, created when absent (server.token_file)")
    parser.add_argument("--preset", default="standard", help="config preset: fast, standard, high")
    parser.add_argument("--config", help="JSON or TOML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. server.max_queue=4")
    parser.add_argument("--runner", help="module:function used instead of im3d.pipeline.run_job (tests, other pipelines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from im3d.config import load_config

    assignments = list(args.set)
    if args.jobs_dir:
        assignments.append(f"server.jobs_dir={json.dumps(str(args.jobs_dir))}")
    if args.token_file:
        assignments.append(f"server.token_file={json.dumps(str(args.token_file))}")
    try:
        config = load_config(args.preset, file=args.config, assignments=assignments)
        if args.port is not None:  # 0 (a free port) is allowed here, unlike in the config
            config.server.port = args.port
        run_fn = load_run_fn(args.runner) if args.runner else None
        serve(config, ready=print_ready, run_fn=run_fn)
    except ServiceError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
