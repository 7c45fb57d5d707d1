"""The generative half of IM-3D on diffusers: text -> reference image -> orbit video, and re-diffusion.

    generate_reference_image(prompt, negative_prompt, config, seed, progress, cancel) -> ReferenceImage
    prepare_reference(image, config) -> ReferenceImage             (a user's own image)
    generate_orbit(reference, config, seed, progress, cancel) -> OrbitFrames
    rediffuse(frames, reference, strength, config, seed, progress, cancel) -> OrbitFrames

Names resolve lazily so that importing `im3d.diffusion.models` (device, model lookup, warm cache)
does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ReferenceImage": "foreground",
    "prepare_reference": "foreground",
    "segment_background_colour": "foreground",
    "soften_edges": "foreground",
    "orbit_frame_mask": "foreground",
    "centre_object": "foreground",
    "generate_reference_image": "text_to_image",
    "object_prompts": "text_to_image",
    "OrbitFrames": "orbit_video",
    "OrbitVideoPipeline": "orbit_video",
    "OrbitUNetSpatioTemporalConditionModel": "orbit_video",
    "generate_orbit": "orbit_video",
    "rediffuse": "orbit_video",
    "orbit_radius": "orbit_video",
    "orbit_frame_cameras": "orbit_video",
    "steps_for_strength": "orbit_video",
    "loaded_models": "models",
    "release_models": "models",
    "resolve_model_folder": "models",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'im3d.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"im3d.diffusion.{_EXPORTS[name]}"), name)
