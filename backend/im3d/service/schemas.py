"""The HTTP API's request and response bodies (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field



class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


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
    # ray executor only (null with local): 1-based place in the fair queue while queued, the worker
    # and attempt (a job whose worker died is retried once), the artist whose token submitted it.
    queue_position: int | None = None
    worker: str | None = None
    attempt: int | None = None
    artist: str | None = None


class JobList(BaseModel):
    jobs: list[JobStatus]


class WorkerStatus(BaseModel):
    """One worker: the backend process itself (local) or a worker actor (ray)."""

    model_config = ConfigDict(extra="allow")  # ray adds node, pid, gpus, jobs_done

    name: str
    alive: bool
    device: str | None = None
    models_loaded: list[str] = Field(default_factory=list)
    running_job: str | None = None


class Health(BaseModel):
    version: str
    protocol: int
    device: str
    models_loaded: list[str]
    queue_length: int
    running_job: str | None
    executor: Literal["local", "ray"] = "local"  # server.executor
    workers: list[WorkerStatus] = Field(default_factory=list)


class UploadResult(BaseModel):
    upload_id: str
    size: int
    sha256: str
    kind: Literal["image", "views"]



class Preset(BaseModel):
    overrides: dict[str, dict[str, Any]]  # what the preset changes relative to the defaults
    values: dict[str, dict[str, Any]]  # the resolved settings of every job section


class Presets(BaseModel):
    default: str
    presets: dict[str, Preset]
