"""One typed, nested configuration for the whole pipeline.

`Config()` holds the paper's numbers (the `standard` preset). Presets are small override
dictionaries applied on top of it; user files (JSON or TOML) and `key=value` overrides are
applied on top of that, in this order. Every key is checked against the dataclasses: an unknown
key or a value of the wrong type is a `ConfigError` that names the full dotted path
(`recon.lpips_wieght`), so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from im3d.errors import Im3dError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(Im3dError, ValueError):
    """A configuration key or value is invalid; the message names its dotted path."""

    def __init__(self, message: str):
        super().__init__("invalid_config", message)


@dataclass
class DiffusionConfig:
    enabled: bool = True  # off: no generative model is used (reconstruct/refine from views only)
    text_to_image_model: str = "stabilityai/sdxl-turbo"  # diffusers model id or local folder
    orbit_model: str = "stabilityai/sv3d"  # orbit-video model (diffusers layout) id or folder
    orbit_profile: Literal["auto", "sv3d_p", "sv3d_u", "custom"] = "auto"  # orbit model's trained settings (diffusion/profiles.py); auto: from orbit_model
    models_dir: str = ""  # extra folder searched for models before the Hugging Face cache
    num_views: int = 21  # frames in the turntable video; unset: the orbit profile's (SV3D: 21; paper: 16)
    elevation_deg: float = 10.0  # camera elevation of the orbit, degrees
    image_size: int = 576  # resolution the orbit model generates at (SV3D: 576)
    text_to_image_steps: int = 4  # denoising steps of the text-to-image model
    text_to_image_guidance: float = 0.0  # classifier-free guidance of text-to-image (0: turbo)
    orbit_steps: int = 50  # denoising steps of the orbit-video model; unset: the profile's (SV3D reference sampler: 50)
    min_guidance: float = 1.0  # SV3D-style linearly increasing guidance: first frame
    max_guidance: float = 2.5  # ... last frame
    refine_strengths: list[float] = field(default_factory=lambda: [0.5, 0.3])  # per round
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16/fp16 on GPU
    cpu_offload: bool = False  # move submodels to the GPU only while they run (small GPUs)
    vae_decode_chunk: int = 8  # frames decoded at once by the VAE (lower: less memory)
    text_to_image_size: int = 0  # side of the text-to-image output; 0: the size the model was trained at (sdxl-turbo: 512), else its default
    orbit_fov_deg: float = 33.8  # field of view of the orbit model's cameras (SV3D: 33.8)
    frame_fill: float = 0.85  # share of the frame side the centred object spans (sets camera distance)
    guidance_profile: Literal["triangle", "linear"] = "triangle"  # guidance over frames (SV3D: triangle)
    cond_aug: float = 1e-5  # noise added to the conditioning image (SV3D: 1e-5)
    background_threshold: float = 0.08  # colour distance from the background that counts as object (orbit frames: less on a clean background)


@dataclass
class ReconConfig:
    backend: Literal["auto", "gsplat", "cpu", "torch"] = "auto"  # rasterizer; auto picks by device
    image_size: int = 256  # side of the square images the splats are fitted to
    steps: int = 1200  # optimisation steps of the first fit (paper: 1,200)
    refine_steps: int = 400  # optimisation steps after each re-diffusion round
    init: Literal["center", "visual_hull"] = "visual_hull"  # initial points: on the masks' visual hull (centre ball when there is none), or the paper's centre ball
    init_points: int = 5000  # initial number of Gaussians (paper: 5,000)
    init_radius: float = 0.3  # radius of the initial ball of points, as a fraction of the object radius
    init_scale: float = 0.015  # initial Gaussian size, as a fraction of the framed object radius
    sh_degree: int = 0  # spherical-harmonics degree of the colours (0..3)
    views_per_step: int = 0  # views rendered per step; 0 means all
    lpips_weight: float = 10.0  # LPIPS loss weight (paper: 10)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LPIPS backbone (paper: VGG)
    msssim_weight: float = 0.2  # (1 - MS-SSIM) loss weight (paper: 0.2)
    mask_weight: float = 1.0  # alpha-vs-mask loss weight (paper: 1)
    l1_weight: float = 0.0  # optional L1 colour loss weight
    l2_weight: float = 0.0  # optional L2 colour loss weight (robustness ablation only)
    densify_every: int = 50  # densify and prune every this many steps (paper: 50)
    densify_start: int = 100  # first step at which densification may run
    densify_stop_fraction: float = 0.75  # no densification after this fraction of the steps
    densify_grad_threshold: float = 0.0002  # screen-space gradient that triggers a split/clone
    prune_opacity: float = 0.005  # Gaussians below this opacity are removed
    max_gaussians: int = 200_000  # hard cap, keeps memory bounded on small machines
    lr_means: float = 5e-3  # learning rate of positions (times the object radius), annealed to 1%
    lr_scales: float = 5e-3  # learning rate of log-scales
    lr_quats: float = 1e-3  # learning rate of rotations
    lr_opacities: float = 5e-2  # learning rate of logit-opacities
    lr_colors: float = 2.5e-3  # learning rate of SH degree-0 colours (higher degrees / 20)
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB behind splats


@dataclass
class MeshConfig:
    grid_resolution: int = 256  # density grid samples per axis
    threshold: float = 0.0  # absolute density iso-level; 0: automatic (threshold_fraction of the local peak)
    threshold_fraction: float = 0.3  # automatic iso-level, as a share of the locally normalised density
    fill_cavities: bool = True  # fill closed interior voids so a sheet of splats gives one outer surface
    snap_to_splats: bool = False  # method "density" only: move vertices inward onto the density ridge
    method: Literal["hull", "tsdf", "density"] = "hull"  # hull: the views' silhouettes + depth carving; density: splat density iso-level; tsdf: fused rendered splat depth (docs/benchmarks.md)
    depth_margin: float = 0.05  # hull: depth carves only space this far (share of the object's half-size) in front of the splats' rendered surface where it faces the view; up to 3x where slanted
    flat_underside: bool = True  # hull: what no view sees beyond the lowest seen point (under an orbit from above) is closed - flat under a standing base, as the sides curve in under a round one - not left as the hull's cone
    open_hollows: bool = True  # hull: a container's inside that no view sees (under an orbit from above) is opened, not left filled
    close_overhangs: bool = True  # hull: the underside of an overhang no view sees (a table top's, under an orbit from above) is closed at the height of its seen edge, not hung as the hull's tent
    fit_outlines: bool = True  # hull: the mesh's outline at each fitted view is moved onto the view's silhouette edge (sub-pixel; marching cubes leaves it inside)
    fit_depth: bool = True  # hull: the surface is pulled in to where the views' depth, less its lag measured at the outlines, agrees it lies (the carving margin's leftovers)
    extra_views: int = 32  # tsdf only: views around the object whose rendered depth is fused besides the fitted views
    truncation_voxels: float = 2.0  # tsdf: signed distances are clamped to this many voxels
    carve_with_masks: bool = True  # tsdf: voxels outside any fitted view's mask are empty (space carving)
    bake_texture: bool = True  # UV atlas + albedo texture; false: vertex colours only
    texture_from_views: bool = True  # texels take the colour of the job's views that see them; false: splat colours only
    min_component_fraction: float = 0.02  # density/tsdf: drop components with fewer faces than this share (the splats' floaters; the hull has none)
    smooth_iterations: int = 10  # Taubin smoothing passes after marching cubes (volume-kept; they take out the pits a lit render shows as dark specks)
    fair_iterations: int = 90  # low-pass Taubin passes after those, parts under 2.5 voxels thick held: flatten the lumps a fit's depth leaves (lit ripples)
    face_budget: int = 50_000  # decimate to at most this many faces
    texture_size: int = 1024  # side of the baked albedo texture (512..2048)
    texture_padding: int = 4  # texels of padding around UV islands (no dark seams when mipmapped)


@dataclass
class PipelineConfig:
    refinement_rounds: int = 2  # re-diffuse + re-fit rounds after the first fit (paper: 2-3)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where the models and splats run
    seed: int = 0  # the one seed of a job: generative models, splat initialisation, view sampling, densification
    preview_every: int = 50  # fitting steps between preview images
    object_size: float = 1.0  # generated objects are scaled to about this size, in metres


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # bind address; anything but loopback needs allow_remote
    port: int = 8765  # TCP port of the HTTP API
    allow_remote: bool = False  # accept non-loopback Host headers and bind addresses
    jobs_dir: str = ""  # where job folders live; empty: the user's data folder
    token_file: str = ""  # bearer token file; empty: beside jobs_dir, created when absent
    max_upload_mb: int = 256  # largest accepted upload
    max_queue: int = 16  # queued jobs beyond the running one
    max_image_pixels: int = 4096 * 4096  # largest image (width x height) an upload may hold, read from its header
    max_frames: int = 512  # most images a views upload may list, all splits together
    max_upload_pixels: int = 512 * 2048 * 2048  # decoded pixels of all images of one upload together
    executor: Literal["local", "ray"] = "local"  # local: one in-process worker; ray: worker actors on a Ray cluster (docs/scale-out.md)
    ray_address: str = ""  # ray: the cluster to join ("auto", "<head>:6379", "ray://<head>:10001"); empty: start a local one
    ray_workers: int = 1  # ray: worker actors in the pool, each runs one job at a time
    ray_num_gpus: float = 1.0  # ray: GPUs each worker actor reserves (0: CPU-only workers)
    ray_resource: str = ""  # ray: a custom resource each worker also reserves one unit of (pins workers to labelled nodes)
    tokens_file: str = ""  # per-artist tokens, one "name token" per line, re-read on change; empty: the single token_file
    max_queue_per_artist: int = 4  # queued jobs one artist may have waiting (fair queueing across artists)


@dataclass
class Config:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON, atomically."""
        from im3d.io_utils import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")


# The standard preset is the paper's setting and equals the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "diffusion": {"orbit_steps": 15},
        "recon": {
            "image_size": 128,
            "steps": 400,
            "refine_steps": 150,
            "init_points": 3000,
            "lpips_net": "alex",
            "views_per_step": 4,
        },
        # grid 128: 192 gained 0.3 dB unlit but resolved the fit's depth noise as pits a lit render shows (docs/benchmarks.md)
        "mesh": {"grid_resolution": 128, "face_budget": 20_000, "texture_size": 512},
        "pipeline": {"refinement_rounds": 1},
    },
    "standard": {},
    "high": {
        "diffusion": {"orbit_steps": 50, "refine_strengths": [0.5, 0.35, 0.2]},
        "recon": {"image_size": 512, "steps": 2000, "refine_steps": 600, "sh_degree": 1},
        "mesh": {"grid_resolution": 384, "face_budget": 150_000, "texture_size": 2048},
        "pipeline": {"refinement_rounds": 3},
    },
}


def load_config(
    preset: str = "standard",
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    assignments: list[str] | None = None,
) -> Config:
    """Resolve a config: preset, then a JSON/TOML file, then a nested dict, then `a.b=value`s."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data: dict[str, Any] = {}
    _merge(data, PRESETS[preset])
    if file is not None:
        _merge(data, read_config_file(file))
    if overrides:
        _merge(data, dict(overrides))
    for assignment in assignments or []:
        _merge(data, parse_assignment(assignment))
    from im3d.diffusion.profiles import apply_orbit_profile  # pure Python; fills the orbit settings left unset

    apply_orbit_profile(data, ConfigError)
    return config_from_dict(data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {error}") from None


def parse_assignment(text: str) -> dict[str, Any]:
    """`recon.steps=600` -> {"recon": {"steps": 600}}; the value is parsed as JSON when it can be."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # a bare string such as recon.backend=cpu
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def config_from_dict(data: Mapping[str, Any]) -> Config:
    config = _build(Config, data, "")
    validate(config)
    return config


def _merge(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, Mapping):
            target[key] = {}
            _merge(target[key], value)
        else:
            target[key] = value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: union types are not supported in the config")  # pragma: no cover
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")  # pragma: no cover


def _check(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {message}")


# Allowed range of every numeric setting, [low, high]. The upper bounds keep what one job can ask
# for finite: no setting may make a job run for days, allocate without bound or hang the worker.
# tests/test_hardening.py fails for a numeric setting missing here.
RANGES: dict[str, tuple[float, float]] = {
    "diffusion.num_views": (2, 64),
    "diffusion.elevation_deg": (-89, 89),
    "diffusion.image_size": (64, 1024),
    "diffusion.text_to_image_steps": (1, 200),
    "diffusion.text_to_image_guidance": (0, 50),
    "diffusion.orbit_steps": (1, 500),
    "diffusion.min_guidance": (0, 50),
    "diffusion.max_guidance": (0, 50),
    "diffusion.refine_strengths": (0, 1),
    "diffusion.vae_decode_chunk": (1, 64),
    "diffusion.text_to_image_size": (0, 2048),
    "diffusion.orbit_fov_deg": (1, 120),
    "diffusion.frame_fill": (0.1, 1),
    "diffusion.cond_aug": (0, 1),
    "diffusion.background_threshold": (0, 1),
    "recon.image_size": (16, 2048),
    "recon.steps": (1, 100_000),
    "recon.refine_steps": (0, 100_000),
    "recon.init_points": (1, 2_000_000),
    "recon.init_radius": (1e-6, 10),
    "recon.init_scale": (1e-6, 10),
    "recon.sh_degree": (0, 3),
    "recon.views_per_step": (0, 1024),
    "recon.lpips_weight": (0, 1000),
    "recon.msssim_weight": (0, 1000),
    "recon.mask_weight": (0, 1000),
    "recon.l1_weight": (0, 1000),
    "recon.l2_weight": (0, 1000),
    "recon.densify_every": (1, 100_000),
    "recon.densify_start": (0, 100_000),
    "recon.densify_stop_fraction": (0, 1),
    "recon.densify_grad_threshold": (0, 1),
    "recon.prune_opacity": (0, 1),
    "recon.max_gaussians": (1, 10_000_000),
    "recon.lr_means": (0, 1),
    "recon.lr_scales": (0, 1),
    "recon.lr_quats": (0, 1),
    "recon.lr_opacities": (0, 1),
    "recon.lr_colors": (0, 1),
    "recon.background": (0, 1),
    "mesh.grid_resolution": (16, 1024),
    "mesh.threshold": (0, 1e6),
    "mesh.threshold_fraction": (0, 1),
    "mesh.extra_views": (0, 512),
    "mesh.depth_margin": (0, 2),
    "mesh.truncation_voxels": (0.5, 16),
    "mesh.min_component_fraction": (0, 1),
    "mesh.smooth_iterations": (0, 100),
    "mesh.fair_iterations": (0, 1000),
    "mesh.face_budget": (100, 10_000_000),
    "mesh.texture_size": (64, 8192),
    "mesh.texture_padding": (0, 256),
    "pipeline.refinement_rounds": (0, 10),
    "pipeline.seed": (0, 2**32 - 1),
    "pipeline.preview_every": (1, 1_000_000),
    "pipeline.object_size": (1e-4, 1000),
    "server.port": (0, 65535),
    "server.max_upload_mb": (1, 65536),
    "server.max_queue": (0, 10_000),
    "server.max_image_pixels": (1, 1 << 30),
    "server.max_frames": (1, 100_000),
    "server.max_upload_pixels": (1, 1 << 34),
    "server.ray_workers": (1, 4096),
    "server.ray_num_gpus": (0, 64),
    "server.max_queue_per_artist": (1, 10_000),
}


def _numbers(config: Config):
    """(dotted path, key in RANGES, value) of every numeric setting; list elements one by one."""
    for section in dataclasses.fields(config):
        node = getattr(config, section.name)
        for item in dataclasses.fields(node):
            key = f"{section.name}.{item.name}"
            value = getattr(node, item.name)
            pairs = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for path, v in pairs:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield path, key, v


def check_ranges(config: Config, finite_only: bool = False) -> None:
    """Every number finite and (unless `finite_only`) within its RANGES entry."""
    for path, key, v in _numbers(config):
        if not math.isfinite(v):
            raise ConfigError(f"{path}: must be a finite number, got {v}")
        if not finite_only and key in RANGES:
            low, high = RANGES[key]
            if not low <= v <= high:
                raise ConfigError(f"{path}: must be within [{low:g}, {high:g}], got {v:g}")


def validate(config: Config) -> None:
    """Range checks that types alone cannot express; then every number against RANGES."""
    check_ranges(config, finite_only=True)
    _validate_relations(config)
    check_ranges(config)


def _validate_relations(config: Config) -> None:
    d, r, m, p, s = config.diffusion, config.recon, config.mesh, config.pipeline, config.server
    _check(d.num_views >= 2, "diffusion.num_views", f"must be at least 2, got {d.num_views}")
    _check(-89 <= d.elevation_deg <= 89, "diffusion.elevation_deg", "must be within [-89, 89] degrees")
    _check(d.image_size >= 64 and d.image_size % 8 == 0, "diffusion.image_size", "must be >= 64 and a multiple of 8")
    _check(d.text_to_image_steps >= 1, "diffusion.text_to_image_steps", "must be at least 1")
    _check(d.orbit_steps >= 1, "diffusion.orbit_steps", "must be at least 1")
    _check(d.vae_decode_chunk >= 1, "diffusion.vae_decode_chunk", "must be at least 1")
    _check(d.text_to_image_size == 0 or (d.text_to_image_size >= 64 and d.text_to_image_size % 8 == 0),
           "diffusion.text_to_image_size", "must be 0 (model default) or >= 64 and a multiple of 8")
    _check(1 <= d.orbit_fov_deg <= 120, "diffusion.orbit_fov_deg", "must be within [1, 120] degrees")
    _check(0.1 <= d.frame_fill <= 1.0, "diffusion.frame_fill", "must be within [0.1, 1]")
    _check(0 <= d.cond_aug <= 1, "diffusion.cond_aug", "must be within [0, 1]")
    _check(0 < d.background_threshold < 1, "diffusion.background_threshold", "must be within (0, 1)")
    _check(d.min_guidance >= 0 and d.max_guidance >= 0, "diffusion.min_guidance", "guidance must not be negative")
    for i, strength in enumerate(d.refine_strengths):
        _check(0.0 < strength <= 1.0, f"diffusion.refine_strengths[{i}]", f"must be in (0, 1], got {strength}")
    _check(r.image_size >= 16, "recon.image_size", f"must be at least 16, got {r.image_size}")
    _check(r.steps >= 1, "recon.steps", "must be at least 1")
    _check(r.refine_steps >= 0, "recon.refine_steps", "must not be negative")
    _check(r.init_points >= 1, "recon.init_points", "must be at least 1")
    _check(r.init_radius > 0, "recon.init_radius", "must be positive")
    _check(r.init_scale > 0, "recon.init_scale", "must be positive")
    _check(0 <= r.sh_degree <= 3, "recon.sh_degree", f"must be 0..3, got {r.sh_degree}")
    _check(r.views_per_step >= 0, "recon.views_per_step", "must be 0 (all) or positive")
    for name in ("lpips_weight", "msssim_weight", "mask_weight", "l1_weight", "l2_weight"):
        _check(getattr(r, name) >= 0, f"recon.{name}", "must not be negative")
    _check(r.densify_every >= 1, "recon.densify_every", "must be at least 1")
    _check(0 <= r.densify_stop_fraction <= 1, "recon.densify_stop_fraction", "must be within [0, 1]")
    _check(0 <= r.prune_opacity < 1, "recon.prune_opacity", "must be within [0, 1)")
    _check(r.max_gaussians >= r.init_points, "recon.max_gaussians", "must be at least recon.init_points")
    _check(len(r.background) == 3, "recon.background", "must be three numbers (RGB)")
    _check(all(0 <= c <= 1 for c in r.background), "recon.background", "values must be within [0, 1]")
    _check(m.grid_resolution >= 16, "mesh.grid_resolution", f"must be at least 16, got {m.grid_resolution}")
    _check(m.threshold >= 0, "mesh.threshold", "must not be negative (0 picks it automatically)")
    _check(0 < m.threshold_fraction < 1, "mesh.threshold_fraction", f"must be within (0, 1), got {m.threshold_fraction}")
    _check(0 <= m.min_component_fraction < 1, "mesh.min_component_fraction", "must be within [0, 1)")
    _check(m.smooth_iterations >= 0, "mesh.smooth_iterations", "must not be negative")
    _check(m.fair_iterations >= 0, "mesh.fair_iterations", "must not be negative")
    _check(m.face_budget >= 100, "mesh.face_budget", f"must be at least 100, got {m.face_budget}")
    _check(64 <= m.texture_size <= 8192, "mesh.texture_size", "must be within 64..8192")
    _check(m.texture_padding >= 0, "mesh.texture_padding", "must not be negative")
    _check(0 <= m.extra_views <= 512, "mesh.extra_views", f"must be within 0..512, got {m.extra_views}")
    _check(0.5 <= m.truncation_voxels <= 16, "mesh.truncation_voxels", f"must be within [0.5, 16], got {m.truncation_voxels}")
    _check(p.refinement_rounds >= 0, "pipeline.refinement_rounds", "must not be negative")
    _check(p.preview_every >= 1, "pipeline.preview_every", "must be at least 1")
    _check(p.object_size > 0, "pipeline.object_size", "must be positive")
    _check(1 <= s.port <= 65535, "server.port", f"must be a TCP port (1..65535), got {s.port}")
    _check(s.max_upload_mb >= 1, "server.max_upload_mb", "must be at least 1")
    _check(s.max_queue >= 0, "server.max_queue", "must not be negative")
    _check(s.ray_workers >= 1, "server.ray_workers", "must be at least 1")
    _check(s.ray_num_gpus >= 0, "server.ray_num_gpus", "must not be negative")
    _check(s.max_queue_per_artist >= 1, "server.max_queue_per_artist", "must be at least 1")


def refine_strength(config: Config, round_index: int) -> float:
    """Strength of re-diffusion round `round_index` (the last listed value repeats)."""
    strengths = config.diffusion.refine_strengths or [0.3]
    return strengths[min(round_index, len(strengths) - 1)]
