"""The HTTP API's request and response bodies (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"


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

