"""Preflight: a job's models are checked before any work, in one message that lists them all.

Runs in milliseconds (file names and a few small JSON files; no torch, no network), so the
service answers the submit with the error and the CLI fails before the first stage.
"""

from __future__ import annotations

from typing import Any, Mapping

from im3d.errors import ModelNotFoundError
from im3d.weights.registry import ModelStatus, format_bytes, model_statuses

BLENDER_HINT = "or in Blender: Edit > Preferences > Add-ons > IM-3D > Models > Download Models"


def missing_models(config: Any, request: Mapping[str, Any] | None = None) -> list[ModelStatus]:
    return [st for st in model_statuses(config, request) if not st.present]


def pull_command(missing: list[ModelStatus]) -> str:
    return "im3d models pull " + " ".join(st.name for st in missing)


def missing_message(missing: list[ModelStatus]) -> str:
    lines = [f"{len(missing)} model(s) this job needs are not on this machine (jobs never download):"]
    for st in missing:
        size = f", {format_bytes(st.download_bytes)} to download" if st.download_bytes else ""
        gated = f"; gated: accept the licence at {st.licence_url} first" if st.gated else ""
        why = "; ".join(st.problems) or st.status
        lines.append(f"  - {st.name} ({st.model_id}): {st.status} — {why}{size}{gated}")
    pullable = [st for st in missing if st.pullable]
    if pullable:
        lines.append(f"Fix: `{pull_command(pullable)}` {BLENDER_HINT}; then submit again.")
    local = [st for st in missing if not st.pullable]
    if local:
        lines.append("Local folders that do not exist: " + ", ".join(st.model_id for st in local) + " — fix the path in the config.")
    return "\n".join(lines)


def preflight(config: Any, request: Mapping[str, Any] | None = None) -> None:
    """Raise `ModelNotFoundError` naming every model the job needs that is missing or incomplete."""
    missing = missing_models(config, request)
    if missing:
        raise ModelNotFoundError(missing_message(missing))
