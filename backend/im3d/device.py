"""The one place that turns `pipeline.device` into a torch device."""

from __future__ import annotations

import sys

from im3d.errors import Im3dError


def resolve_device(requested: str = "auto"):
    """`auto` picks CUDA, then Apple MPS, then the CPU; an unavailable explicit choice is an error."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise Im3dError("device_unavailable", "pipeline.device is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    if requested == "mps" and not mps_ok:
        raise Im3dError("device_unavailable", "pipeline.device is 'mps' but Apple MPS is not available; use 'auto' or 'cpu'")
    return torch.device(requested)


def describe_device(requested: str = "auto") -> str:
    """The device jobs run on, for /v1/health; says `requested` as is until torch is loaded
    (the HTTP side never imports torch itself: start-up stays fast)."""
    if "torch" not in sys.modules:
        return requested
    try:
        return resolve_device(requested).type
    except Im3dError:
        return f"{requested} (unavailable)"
