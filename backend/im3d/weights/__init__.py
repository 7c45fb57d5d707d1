"""Getting and checking the models the method needs: list, pull, preflight (see docs/diffusion.md).

The registry and preflight read only the filesystem (no torch, no network); `pull` talks to the
Hugging Face Hub through `huggingface_hub` and to torchvision's download server.
"""

from im3d.weights.preflight import missing_message, missing_models, preflight, pull_command
from im3d.weights.registry import (
    KNOWN_MODELS,
    LPIPS_BACKBONES,
    SGM_CHECKPOINTS,
    ModelStatus,
    backbone_path,
    candidate_folders,
    converted_folder,
    diffusers_folder_problems,
    format_bytes,
    hf_cache_dir,
    model_status,
    model_statuses,
    models_root,
    needed_models,
    sgm_source,
)

__all__ = [
    "KNOWN_MODELS", "LPIPS_BACKBONES", "SGM_CHECKPOINTS", "ModelStatus", "backbone_path", "candidate_folders",
    "converted_folder", "diffusers_folder_problems", "format_bytes", "hf_cache_dir", "missing_message",
    "missing_models", "model_status", "model_statuses", "models_root", "needed_models", "preflight",
    "pull_command", "sgm_source",
]
