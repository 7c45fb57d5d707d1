"""From the panel's settings to a `JobSpec` (the typed request `jobs.JobRun` sends). bpy only to read paths."""

from __future__ import annotations

import json

import bpy

from .client import BackendError
from .jobs import JobSpec


def parse_overrides(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise BackendError("invalid_request", f"the advanced overrides are not valid JSON ({error}); write e.g. {{\"recon\": {{\"steps\": 300}}}}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise BackendError("invalid_request", 'the advanced overrides must be {"section": {"key": value}}')
    return value


def job_spec_overrides(state, kind: str) -> dict:
    """Only what the artist changed: everything else is the backend's preset, resolved by the backend."""
    overrides: dict = {}
    if state.use_custom_settings:
        overrides.setdefault("pipeline", {})["refinement_rounds"] = state.refinement_rounds
        overrides.setdefault("mesh", {})["face_budget"] = state.face_budget
        overrides.setdefault("mesh", {})["texture_size"] = int(state.texture_size)
    if not state.use_lpips:
        overrides.setdefault("recon", {})["lpips_weight"] = 0.0
    if kind == "refine":
        if state.refine_use_diffusion:
            overrides.setdefault("diffusion", {})["refine_strengths"] = [state.refine_strength]
        else:
            overrides.setdefault("diffusion", {})["enabled"] = False
    for section, values in parse_overrides(state.advanced_overrides).items():
        overrides.setdefault(section, {}).update(values)
    return overrides


def lpips_wanted(state) -> bool:
    """Whether this job's fit uses LPIPS (the switch, unless the expert overrides set the weight)."""
    if not state.use_lpips:
        return False
    recon = parse_overrides(state.advanced_overrides).get("recon", {})
    return float(recon.get("lpips_weight", 1.0) or 0.0) > 0.0


def make_spec(state, kind: str, views_dir: str | None = None) -> JobSpec:
    return JobSpec(
        kind=kind,
        prompt=state.prompt,
        negative_prompt=state.negative_prompt,
        image_path=bpy.path.abspath(state.image_path) if (state.image_path and kind == "generate") else None,
        views_dir=views_dir,
        seed=state.seed,
        preset=state.preset.lower(),
        overrides=job_spec_overrides(state, kind),
    )
