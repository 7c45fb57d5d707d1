"""A job request, typed: what the HTTP API accepts (`JobRequest`) and what the pipeline runs on (`JobInputs`).

The rules that tie a job's kind to its inputs ("generate needs a prompt or an image", ...) are
written once, in `check_inputs`; the wire model, the CLI and the service all call it. The seed is
not an input: it is `pipeline.seed` of the job's config (see `im3d.config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from im3d.errors import Im3dError

Kind = Literal["generate", "refine", "reconstruct"]
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"
SECTIONS = Literal["diffusion", "recon", "mesh", "pipeline", "server"]  # server: refused with a clear message at submit


def check_inputs(kind: str, prompt: str, has_image: bool, has_views: bool, diffusion_enabled: bool | None = None) -> None:
    """Raise `invalid_request` when a job of `kind` lacks what it needs (`diffusion_enabled`:
    None when the config is not resolved yet; the rule that depends on it is checked later)."""
    if kind == "generate" and not prompt.strip() and not has_image:
        raise Im3dError("invalid_request", "a generate job needs a prompt or an image")
    if kind == "generate" and diffusion_enabled is False:
        raise Im3dError("invalid_request", "a generate job needs the diffusion stage, but diffusion.enabled is false")
    if kind in ("refine", "reconstruct") and not has_views:
        raise Im3dError("invalid_request", f"a {kind} job needs views: a dataset folder (or uploaded zip) with transforms.json + images")
    if kind == "refine" and diffusion_enabled and not prompt.strip():
        raise Im3dError("invalid_request", "a refine job needs a prompt (or overrides {'diffusion': {'enabled': false}})")


class JobRequest(BaseModel):
    """The body of POST /v1/jobs; unknown fields and wrong types are refused (422)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Kind
    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    image: str | None = Field(None, pattern=UPLOAD_ID_PATTERN, description="upload_id of a PNG/JPEG upload")
    views: str | None = Field(None, pattern=UPLOAD_ID_PATTERN, description="upload_id of a views zip upload")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="pipeline.seed of the job; absent: a random one (recorded)")
    preset: Literal["fast", "standard", "high"] = "standard"
    overrides: dict[SECTIONS, dict[str, Any]] = Field(
        default_factory=dict, description="{section: {key: value}} applied on top of the preset (GET /v1/presets lists them)"
    )

    @model_validator(mode="after")
    def _inputs_match_kind(self) -> "JobRequest":
        try:
            check_inputs(self.kind, self.prompt, self.image is not None, self.views is not None)
        except Im3dError as error:
            raise ValueError(error.message) from None
        return self


@dataclass(frozen=True)
class JobInputs:
    """What a job runs on: local files, resolved from upload ids by the service or given by the CLI."""

    kind: Kind
    prompt: str = ""
    negative_prompt: str = ""
    image: Path | None = None  # reference image file
    views: Path | None = None  # dataset folder with transforms.json

    def check(self, diffusion_enabled: bool) -> None:
        check_inputs(self.kind, self.prompt, self.image is not None, self.views is not None, diffusion_enabled)
