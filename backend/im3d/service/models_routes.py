"""`/v1/models`: what the jobs need, and pulling it in the background (docs/protocol.md).

    GET  /v1/models?preset=standard   every model a job of that preset needs, with status and sizes
    POST /v1/models/pull              start downloading what is missing (202); token in the body only
    GET  /v1/models/pull              the running / last pull: state, progress, message, error
    POST /v1/models/pull/cancel       stop it between chunks (a later pull continues)
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from im3d.errors import Im3dError
from im3d.weights.pull import select_statuses
from im3d.weights.tasks import PullTasks

SECTIONS = Literal["diffusion", "recon", "mesh", "pipeline"]


class ModelInfo(BaseModel):
    name: str = Field(description="what pull takes: text-to-image, orbit-video, lpips-vgg, lpips-alex")
    role: str
    model_id: str
    source: str = Field(description="huggingface | huggingface-sgm (download + convert) | url | local")
    path: str = Field(description="where it is, or where pull puts it (on the backend's machine)")
    status: Literal["present", "missing", "incomplete"]
    problems: list[str]
    size_on_disk: int
    download_bytes: int | None
    licence: str
    licence_url: str
    gated: bool
    pullable: bool


class PullError(BaseModel):
    code: str
    message: str


class PullStatus(BaseModel):
    id: str
    state: Literal["running", "succeeded", "failed", "cancelled"]
    progress: float
    message: str
    names: list[str]
    error: PullError | None
    models: list[ModelInfo]
    started: float
    finished: float | None


class ModelList(BaseModel):
    preset: str
    models: list[ModelInfo]
    missing: list[str] = Field(description="names of the models that are not present")
    pull_command: str = Field(description="the CLI command that fetches the missing ones ('' when none)")
    pull: PullStatus | None = Field(description="the running or last pull of this backend process")


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    names: list[str] = Field(default_factory=list, description="models to pull (default: every missing one)")
    preset: Literal["fast", "standard", "high"] = "standard"
    overrides: dict[SECTIONS, dict[str, Any]] = Field(default_factory=dict, description="as in POST /v1/jobs")
    token: str | None = Field(None, max_length=400, description="Hugging Face access token for gated models; used for this pull only, never stored")


def models_router(manager: Any, tasks: PullTasks) -> APIRouter:
    """The routes; `manager.job_config` resolves a config exactly as a job's is resolved."""
    router = APIRouter(prefix="/v1/models", tags=["models"])

    def config_for(preset: str, overrides: dict | None = None) -> Any:
        return manager.job_config(preset, overrides or {}, 0)

    def pull_status() -> dict | None:
        return tasks.current.status() if tasks.current is not None else None

    @router.get("", response_model=ModelList)
    def list_models(request: Request, preset: Literal["fast", "standard", "high"] = Query("standard")) -> dict[str, Any]:
        # Strict like the JSON bodies: a misspelt parameter must not silently list the standard preset.
        unknown = sorted(set(request.query_params) - {"preset"})
        if unknown:
            raise Im3dError("invalid_request", f"unknown query parameter(s) {unknown}; only 'preset' is accepted")
        statuses = select_statuses(config_for(preset))
        missing = [st for st in statuses if not st.present]
        pullable = [st.name for st in missing if st.pullable]
        return {"preset": preset, "models": [st.to_dict() for st in statuses], "missing": [st.name for st in missing],
                "pull_command": f"im3d models pull {' '.join(pullable)}" if pullable else "", "pull": pull_status()}

    @router.post("/pull", status_code=202, response_model=PullStatus)
    def start_pull(body: PullRequest) -> dict[str, Any]:
        config = config_for(body.preset, body.overrides)
        select_statuses(config, body.names or None)  # unknown names: 422 now, not a failed task later
        return tasks.start(config, body.names or None, body.token or None).status()

    @router.get("/pull", response_model=PullStatus)
    def get_pull() -> dict[str, Any]:
        status = pull_status()
        if status is None:
            raise Im3dError("not_found", "no model pull has run in this backend process; POST /v1/models/pull starts one")
        return status

    @router.post("/pull/cancel", response_model=PullStatus)
    def cancel_pull() -> dict[str, Any]:
        task = tasks.cancel()
        if task is None:
            raise Im3dError("not_found", "no model pull has run in this backend process")
        return task.status()

    return router
