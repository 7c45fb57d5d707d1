"""The v1 HTTP API (docs/protocol.md): routes, error handlers and the OpenAPI document.

Nothing here imports torch: the job worker imports the pipeline on the first job.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from im3d import PROTOCOL_VERSION, __version__
from im3d.config import PRESETS, Config, load_config
from im3d.errors import Im3dError, http_status, storage_error
from im3d.request import JobRequest
from im3d.service.auth import GuardMiddleware, error_response
from im3d.service.schemas import (
    ErrorDetail,
    ErrorResponse,
    Health,
    JobCreated,
    JobList,
    JobStatus,
    Presets,
    UploadResult,
)
from im3d.service.store import JobStore
from im3d.service.uploads import detect_upload_kind
from im3d.service.worker import JobManager, RunFn

log = logging.getLogger("im3d.server")


def file_response(path: Path, media_type: str) -> StreamingResponse:
    """Serve the file from one open handle: its length and its bytes are those of one version of
    the file, even when a preview is atomically replaced while it is being sent."""
    handle = open(path, "rb")
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        remaining = size
        while remaining > 0:
            chunk = handle.read(min(1 << 16, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk

    return StreamingResponse(
        chunks(), media_type=media_type, headers={"Content-Length": str(size)}, background=BackgroundTask(handle.close)
    )


def preset_table() -> dict[str, Any]:
    """{default, presets: {name: {overrides, values}}}; values are `load_config(name)` less `server`."""
    table = {}
    for name, overrides in PRESETS.items():
        values = load_config(name).to_dict()
        values.pop("server")
        table[name] = {"overrides": json.loads(json.dumps(overrides)), "values": values}
    return {"default": "standard", "presets": table}

UPLOAD_TYPES = ("image/png", "image/jpeg", "application/zip")
ARTIFACT_TYPES = {".glb": "model/gltf-binary", ".png": "image/png", ".json": "application/json", ".ply": "application/octet-stream"}


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


async def on_im3d_error(request: Request, exc: Im3dError) -> JSONResponse:
    return error_response(http_status(exc.code), exc.code, exc.message)


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
    from im3d.service.serving import resolve_jobs_dir

    store = JobStore(jobs_dir or resolve_jobs_dir(config))
    if config.server.executor == "ray":
        from im3d.service.ray_executor import RayJobManager  # Ray is imported only when asked for

        manager = RayJobManager(store, run_fn=run_fn, config=config)
    else:
        manager = JobManager(store, run_fn=run_fn, config=config)
    max_upload = config.server.max_upload_mb * (1 << 20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(manager.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(lambda: manager.shutdown(timeout=3.0))  # within the SIGTERM deadline
            await anyio.to_thread.run_sync(model_pulls.shutdown)  # a running model pull stops between chunks

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
    from im3d.service.models_routes import PullTasks, models_router  # /v1/models: list and pull (im3d.weights)

    model_pulls = app.state.model_pulls = PullTasks()
    app.include_router(models_router(manager, model_pulls))
    tokens = None
    if config.server.tokens_file:
        from im3d.service.tokens import TokenBook  # per-artist tokens (a studio); the backend's own stays valid

        tokens = TokenBook(config.server.tokens_file, local_token=token)
    app.add_middleware(GuardMiddleware, token=token, allow_remote=config.server.allow_remote, tokens=tokens)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Im3dError, on_im3d_error)
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
            "executor": manager.executor_name,
            "workers": manager.workers(),
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
        too_large = Im3dError("upload_too_large", f"uploads are limited to {config.server.max_upload_mb} MiB (server.max_upload_mb); send a smaller file")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise Im3dError("bad_request", "the Content-Length header is not a number")
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
                raise Im3dError("invalid_upload", "the upload is empty; send the file's bytes as the request body")
            kind = detect_upload_kind(content_type, head)
            filename = request.headers.get("x-filename", "")
            meta = await anyio.to_thread.run_sync(
                store.finish_upload, upload_id, staging, content_type, kind, size, digest.hexdigest(), filename, 4 * max_upload, config.server
            )
        except BaseException:
            await anyio.to_thread.run_sync(store.discard, staging)
            raise
        log.info("upload %s stored (%s, %d bytes)", upload_id, kind, size)
        return {"upload_id": upload_id, "size": meta["size"], "sha256": meta["sha256"], "kind": kind}

    @app.post("/v1/jobs", status_code=201, response_model=JobCreated)
    def create_job(body: JobRequest, request: Request) -> dict[str, str]:
        artist = getattr(request.state, "artist", None) or ""  # set by GuardMiddleware from a per-artist token
        return {"id": manager.submit(body, artist=artist)}

    @app.get("/v1/presets", response_model=Presets)
    def presets() -> dict[str, Any]:
        """Every preset with its resolved job settings, so clients never repeat backend defaults."""
        return preset_table()

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
    def artifact(job_id: str, name: str) -> StreamingResponse:
        status = manager.status(job_id)
        path = store.artifact_path(job_id, name) if status["state"] == "succeeded" else None
        if path is None:
            raise Im3dError("artifact_not_found", f"job {job_id} has no artifact {name[:100]!r}; use a name listed in its status 'artifacts'")
        return file_response(path, ARTIFACT_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    png = {"200": {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.get("/v1/jobs/{job_id}/previews/{name}", response_class=FileResponse, responses=png)
    def preview(job_id: str, name: str) -> StreamingResponse:
        manager.status(job_id)
        path = store.preview_path(job_id, name)
        if path is None:
            raise Im3dError("preview_not_found", f"job {job_id} has no preview {name[:100]!r}; use a name listed in its status 'previews'")
        return file_response(path, "image/png")

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

