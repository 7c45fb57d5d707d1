"""Orbit-model profiles: what a model was trained with decides the orbit settings.

Choosing `diffusion.orbit_model` picks a profile (`diffusion.orbit_profile`, `auto` by default:
from the model's id, or from the converted folder's `im3d_conversion.json` / `unet/config.json`),
and the profile fills every orbit setting the user did not set: frame count, elevation, field of
view, input size, steps, guidance, conditioning noise. A setting the user did set wins, but is
checked against what the model can do (SV3D_u has no camera input: it only makes 21 frames at
elevation 0). The resolved config, saved with every job, records the profile by name.

Values are those of Stability's reference sampler (generative-models
`scripts/sampling/simple_video_sample.py` and `configs/sv3d_{p,u}.yaml`).

Pure Python (no torch): `load_config` applies profiles while resolving a config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Config keys (under `diffusion.`) a profile sets.
PROFILE_KEYS = ("num_views", "elevation_deg", "image_size", "orbit_fov_deg", "orbit_steps", "min_guidance",
                "max_guidance", "guidance_profile", "cond_aug")  # fmt: skip


@dataclass(frozen=True)
class OrbitProfile:
    name: str  # sv3d_p | sv3d_u | custom
    description: str  # one line for people
    defaults: dict[str, Any]  # diffusion.<key> -> value used when the user set none
    fixed: dict[str, Any] = field(default_factory=dict)  # diffusion.<key> -> the only value the model supports
    camera_ids: bool = True  # per-frame (cond_aug, polar, azimuth) ids; False: cond_aug only


_SV3D = {
    "image_size": 576,  # trained at 576x576
    "orbit_fov_deg": 33.8,  # Objaverse renders SV3D was trained on
    "orbit_steps": 50,  # simple_video_sample.py's default for sv3d_p / sv3d_u
    "min_guidance": 1.0,  # TrianglePredictionGuider min_scale
    "max_guidance": 2.5,  # TrianglePredictionGuider max_scale
    "guidance_profile": "triangle",
    "cond_aug": 1e-5,  # simple_video_sample.py forces 1e-5 for SV3D
}

PROFILES: dict[str, OrbitProfile] = {
    "sv3d_p": OrbitProfile(
        "sv3d_p", "SV3D_p: 21 frames at 576², any elevation, per-frame polar + azimuth conditioning",
        defaults={**_SV3D, "num_views": 21, "elevation_deg": 10.0},
    ),
    "sv3d_u": OrbitProfile(
        "sv3d_u", "SV3D_u: 21 frames at 576² on a fixed orbit at elevation 0, no camera input",
        defaults={**_SV3D, "num_views": 21, "elevation_deg": 0.0},
        fixed={"num_views": 21, "elevation_deg": 0.0},
        camera_ids=False,
    ),
    "custom": OrbitProfile("custom", "another orbit-video model: every setting as configured", defaults={}),
}


def detect_profile(orbit_model: str, models_dir: str = "") -> str:
    """The profile name for an orbit model id or folder: sv3d_u / sv3d_p by name or by the folder's
    converted-model record / UNet config; `sv3d_p` for Stability's `stabilityai/sv3d` repository."""
    for folder in _candidate_folders(orbit_model, models_dir):
        record = folder / "im3d_conversion.json"
        try:
            if record.is_file():
                variant = json.loads(record.read_text()).get("variant")
                if variant in PROFILES:
                    return variant
            unet = folder / "unet" / "config.json"
            if unet.is_file():
                config = json.loads(unet.read_text())
                dims = config.get("addition_time_embed_dims")
                width = config.get("projection_class_embeddings_input_dim")
                if (dims is not None and len(dims) == 1) or width == 256:
                    return "sv3d_u"
                if width == 1280:
                    return "sv3d_p"
                return "custom"  # e.g. stock SVD (768: fps, motion bucket, cond_aug)
        except (OSError, ValueError):
            continue
    name = orbit_model.lower().replace("-", "_")
    if "sv3d_u" in name:
        return "sv3d_u"
    if "sv3d" in name:
        return "sv3d_p"
    return "custom"


def _candidate_folders(orbit_model: str, models_dir: str) -> list[Path]:
    folders = [Path(orbit_model).expanduser()]
    if models_dir and orbit_model:
        root = Path(models_dir).expanduser()
        folders += [root / orbit_model, root / orbit_model.replace("/", "--"), root / orbit_model.split("/")[-1]]
    return [f for f in folders if f.is_dir()]


def apply_orbit_profile(data: dict[str, Any], error: type[Exception] = ValueError) -> str:
    """Fill `data["diffusion"]` (a config being resolved) from the orbit model's profile.

    Keys the user set are kept and checked against the profile's fixed values; the resolved
    profile name is written to `diffusion.orbit_profile`. Returns that name. `error` is the
    exception raised for a setting the model cannot honour (the config's `ConfigError`).
    """
    from im3d.config import DiffusionConfig

    d = data.setdefault("diffusion", {})
    if not isinstance(d, dict):
        return "custom"  # the config builder reports the type error with its path
    name = d.get("orbit_profile", "auto")
    if name == "auto":
        name = detect_profile(str(d.get("orbit_model", DiffusionConfig.orbit_model)), str(d.get("models_dir", "")))
    if name not in PROFILES:
        return name  # the config builder reports the unknown choice with its path
    profile = PROFILES[name]
    for key, value in profile.fixed.items():
        if key in d and d[key] != value:
            raise error(
                f"diffusion.{key}: {profile.name} supports only {value!r} ({profile.description}); got {d[key]!r}. "
                f"Remove the setting, or use an orbit model with camera conditioning (sv3d_p)"
            )
    for key, value in profile.defaults.items():
        d.setdefault(key, value)
    d["orbit_profile"] = name
    return name


__all__ = ["PROFILES", "PROFILE_KEYS", "OrbitProfile", "apply_orbit_profile", "detect_profile"]
