"""The IM-3D method as numbered stages, each reporting progress and honouring cancel.

    generate:    prompt | image → 1 reference image → 2 orbit video → 3 fit splats
                 → 4 for each round: render at the video's cameras, re-diffuse, keep fitting
                 → 5 mesh + texture → 6 artifacts
    refine:      views of an existing object (+ prompt, optional image) → 3 fit → 4 re-diffuse the
                 views at the chosen strength and keep fitting → 5 mesh → 6 artifacts
    reconstruct: views → 3 fit → 5 mesh → 6 artifacts (no diffusion, no generative weights)

`run_job()` is what the job service calls; the CLI calls it too. Artifacts are written
atomically into the job's work directory; the service writes `manifest.json` after it returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from im3d.cameras import Cameras, MultiViewDataset, find_transforms, orbit_cameras, read_transforms
from im3d.config import Config, refine_strength
from im3d.device import resolve_device
from im3d.errors import PipelineError, check_cancel
from im3d.io_utils import atomic_write_bytes, atomic_write_json
from im3d.request import JobInputs

ProgressFn = Callable[[str, float, str, "Path | None"], None]

# Below this mask IoU on its own training views a fit reconstructed nothing (any object fitted for
# even a few dozen steps scores far above it); the job fails instead of calling it a result.
MIN_TRAIN_MASK_IOU = 0.02

# Relative cost of the stages, for one overall progress fraction.
STAGE_WEIGHTS = {
    "load": 0.02,
    "reference": 0.08,
    "orbit": 0.2,
    "fit": 0.4,
    "refine": 0.2,
    "mesh": 0.08,
    "export": 0.02,
}


class StageProgress:
    """Maps (stage, fraction within the stage) to one overall fraction for the stages a job runs."""

    def __init__(self, stages: list[str], report: ProgressFn | None):
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.offsets: dict[str, tuple[float, float]] = {}
        acc = 0.0
        for s in stages:
            self.offsets[s] = (acc / total, STAGE_WEIGHTS[s] / total)
            acc += STAGE_WEIGHTS[s]
        self.report = report
        self.number = {s: i + 1 for i, s in enumerate(stages)}
        self.count = len(stages)
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str, preview: Path | None = None) -> None:
        if self.report is None:
            return
        start, width = self.offsets[stage]
        overall = min(1.0, start + width * min(max(fraction, 0.0), 1.0))
        overall = self.last = max(overall, self.last)  # never backwards, whatever the rounding
        self.report(stage, overall, f"[{self.number[stage]}/{self.count}] {message}", preview)


_LPIPS_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def lpips_model(config: Config, device: torch.device) -> torch.nn.Module | None:
    """LPIPS kept warm for the life of the process (the service runs many jobs)."""
    if config.recon.lpips_weight <= 0:
        return None
    from im3d.splats.losses import load_lpips

    key = (config.recon.lpips_net, str(device))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = load_lpips(config.recon.lpips_net, device)
    return _LPIPS_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Images


def to_uint8(images: Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: Path, image: Tensor | np.ndarray) -> Path:
    """[H,W,3|4] float in [0,1] or uint8 -> PNG, written atomically."""
    import io

    from PIL import Image

    array = image if isinstance(image, np.ndarray) else to_uint8(image)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def image_strip(images: Tensor, max_views: int = 8) -> Tensor:
    """[C,H,W,K] -> one row [H, min(C,max_views)*W, K] of evenly picked views."""
    C = images.shape[0]
    picks = torch.linspace(0, C - 1, min(C, max_views)).round().long()
    return torch.cat(list(images[picks]), dim=1)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class JobOutput:
    artifacts: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0  # generative-model network evaluations (the paper's efficiency measure)


def run_job(request: JobInputs, workdir: Path, config: Config, progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> dict[str, Path]:
    """Run one job; returns artifact name -> path inside `workdir` (see module docstring).

    The seed of every random choice is `config.pipeline.seed`; the request carries no seed.
    """
    from im3d.memory import check_memory

    request.check(config.diffusion.enabled)
    kind = request.kind
    check_memory(config, kind, request.views, resolve_device(config.pipeline.device).type)  # before any work
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "reconstruct" or (kind == "refine" and not config.diffusion.enabled):
        output = reconstruct(request, workdir, config, progress, cancel)
    elif kind == "refine":
        output = refine(request, workdir, config, progress, cancel)
    elif kind == "generate":
        output = generate(request, workdir, config, progress, cancel)
    else:
        raise PipelineError("invalid_request", f"unknown job kind {kind!r}; use generate, refine or reconstruct")
    return output.artifacts


# ----------------------------------------------------------------------------------------------
# Shared stages


def _load_views(request: JobInputs, report: StageProgress, config: Config, cancel=None) -> tuple[MultiViewDataset, MultiViewDataset | None]:
    """The job's views, decoded straight to the size the job uses (memory follows the config, not
    the files), and checked: views that cannot make an object fail here with a code that says why."""
    views = request.views
    report("load", 0.0, "reading views")
    size = config.recon.image_size
    if request.kind == "refine" and config.diffusion.enabled:
        size = max(size, config.diffusion.image_size)  # the reference view feeds the orbit model
    limit = config.server.max_image_pixels
    train = read_transforms(views, "train", max_size=size, max_pixels=limit, cancel=cancel)
    test = None
    if _has_split(views, "test"):  # held-out views are optional; when present they must be valid
        test = read_transforms(views, "test", max_size=config.recon.image_size, max_pixels=limit, cancel=cancel)
    check_views_usable(train)
    report("load", 1.0, f"{len(train.cameras)} views of {train.cameras.width}x{train.cameras.height}")
    return train, test


def _has_split(views: Path, split: str) -> bool:
    from im3d.cameras import DatasetError

    try:
        return find_transforms(views, split) is not None
    except DatasetError:
        return False


def check_views_usable(train: MultiViewDataset) -> None:
    """Refuse views from which no object can be fitted, instead of reporting garbage as success."""
    if bool((train.masks < 0.5).all()):
        raise PipelineError("no_object_found", "no object found: every pixel of every view is transparent (alpha 0)")
    if bool((train.masks > 0.999).all()):
        raise PipelineError(
            "no_alpha",
            "no view has transparency: the alpha channel is the object's mask; render the views with a transparent "
            "background (Blender: Film > Transparent) and save RGBA PNGs",
        )
    centers = train.cameras.centers().double()
    spread = float((centers - centers.mean(0)).norm(dim=1).max())
    if len(centers) < 2 or spread <= 1e-6 * (1.0 + float(centers.norm(dim=1).max())):
        raise PipelineError(
            "degenerate_cameras",
            f"all {len(centers)} cameras sit at one position, so the views hold no 3D information; "
            "check the transform_matrix of each frame (they should orbit the object)",
        )


def check_fit_result(train_metrics: dict[str, float]) -> None:
    """A fit whose own training views say nothing was reconstructed is not a result."""
    if train_metrics.get("mask_iou", 1.0) < MIN_TRAIN_MASK_IOU:
        raise PipelineError(
            "reconstruction_failed",
            f"the fitted splats do not cover the object in the training views (mask IoU {train_metrics['mask_iou']:.3f}); "
            "check that the views' alpha masks and cameras belong together, or raise recon.steps",
        )


def _fit(fitter, steps: int, stage: str, report: StageProgress, workdir: Path, config: Config, cancel, label: str) -> dict[str, Any]:
    preview_cameras = fitter.cameras[torch.linspace(0, len(fitter.cameras) - 1, min(4, len(fitter.cameras))).round().long().tolist()]

    def on_step(info) -> None:
        preview = None
        if info.step % config.pipeline.preview_every == 0 or info.step == info.total:
            colors, _ = fitter.render(preview_cameras)
            preview = save_png(workdir / "previews" / "latest.png", image_strip(colors))
        report(stage, info.step / info.total, f"{label}: step {info.step}/{info.total}, loss {info.loss:.4f}, {info.num_gaussians} Gaussians", preview)

    result = fitter.fit(steps, on_step=on_step, cancel=cancel)
    return {"steps": result.steps, "loss": result.final_loss, "seconds": result.seconds, "gaussians": result.num_gaussians, "rollbacks": result.rollbacks}


def _mesh_and_export(fitter, workdir: Path, config: Config, report: StageProgress, cancel, output: JobOutput, views=None) -> None:
    """Mesh the splats; `views` (cameras, images, masks: the views the splats were last fitted to)
    are back-projected into the texture."""
    from im3d.mesh import export_glb, mesh_from_splats
    from im3d.mesh.errors import MeshingError
    from im3d.splats.ply import write_ply

    check_cancel(cancel)
    report("mesh", 0.0, "extracting the surface")
    splats = {k: v.detach().cpu() for k, v in fitter.splats.items()}
    started = time.perf_counter()
    try:
        result = mesh_from_splats(splats, config.mesh, progress=lambda f, m: report("mesh", f, m), cancel=cancel, views=views)
        export_glb(result, workdir / "mesh.glb")
    except MeshingError as error:
        code = "no_object_found" if error.code == "no_surface" else f"mesh_{error.code}"
        raise PipelineError(code, f"meshing failed: {error}") from None
    output.timings["mesh_s"] = time.perf_counter() - started
    output.metrics["mesh"] = result.report.to_dict()
    output.artifacts["mesh.glb"] = workdir / "mesh.glb"

    report("export", 0.0, "writing splats and previews")
    write_ply(workdir / "splats.ply", splats)
    output.artifacts["splats.ply"] = workdir / "splats.ply"
    turntable = orbit_cameras(
        8, elevation_deg=15.0, radius=1.1 * fitter.scene_scale / math.tan(math.radians(20)), fov_deg=40.0,
        width=192, target=tuple(float(x) for x in fitter.center),
    )
    colors, _ = fitter.render(turntable)
    output.artifacts["preview.png"] = save_png(workdir / "preview.png", image_strip(colors))
    report("export", 1.0, "done")


def _finish(workdir: Path, config: Config, output: JobOutput) -> None:
    output.metrics["timings"] = output.timings
    output.metrics["model_evaluations"] = output.evaluations
    atomic_write_json(workdir / "metrics.json", output.metrics)
    output.artifacts["metrics.json"] = workdir / "metrics.json"
    config.save(workdir / "config.json")
    output.artifacts["config.json"] = workdir / "config.json"


# ----------------------------------------------------------------------------------------------
# The three kinds of job


def reconstruct(request: JobInputs, workdir: Path, config: Config, progress: ProgressFn | None, cancel) -> JobOutput:
    """Views → fit → mesh. No generative model: runs anywhere, with no weights but LPIPS's backbone."""
    from im3d.splats.fit import SplatFitter

    report = StageProgress(["load", "fit", "mesh", "export"], progress)
    output = JobOutput()
    device = resolve_device(config.pipeline.device)
    train, test = _load_views(request, report, config, cancel)
    check_cancel(cancel)
    started = time.perf_counter()
    fitter = SplatFitter(config.recon, train.cameras, train.images, train.masks, device, lpips_model(config, device), seed=config.pipeline.seed)
    output.metrics["fit"] = _fit(fitter, config.recon.steps, "fit", report, workdir, config, cancel, "fitting splats")
    output.timings["fit_s"] = time.perf_counter() - started
    if test is not None:
        output.metrics["heldout"] = fitter.evaluate(test.cameras, test.images, test.masks)
    output.metrics["train"] = fitter.evaluate(train.cameras, train.images, train.masks)
    check_fit_result(output.metrics["train"])
    _mesh_and_export(fitter, workdir, config, report, cancel, output, views=train)
    _finish(workdir, config, output)
    return output


def _save_frames(workdir: Path, name: str, images: Tensor, output: JobOutput) -> Path:
    path = save_png(workdir / name, image_strip(images, max_views=len(images)))
    output.artifacts[name] = path
    return path


def _object_extent(fitter) -> tuple[Tensor, float]:
    """Centre and diameter of the fitted object (robust: opaque Gaussians, 1st-99th percentile)."""
    means = fitter.splats["means"].detach().cpu()
    opaque = torch.sigmoid(fitter.splats["opacities"].detach().cpu()) > 0.3
    pts = means[opaque] if int(opaque.sum()) >= 10 else means
    lo, hi = torch.quantile(pts, 0.01, dim=0), torch.quantile(pts, 0.99, dim=0)
    return (lo + hi) / 2, float((hi - lo).norm())


def _rediffusion_rounds(fitter, reference, cameras: Cameras, rounds: int, config: Config, request: JobInputs,
                        report: StageProgress, workdir: Path, cancel, output: JobOutput):
    """IM-3D's loop: render the splats at the orbit's cameras, re-diffuse at the round's strength, keep fitting.

    Returns the last round's frames as views (cameras, images, masks) for the texture bake.
    """
    from im3d.diffusion import rediffuse
    from im3d.mesh.bake_views import ViewImages

    last = None

    seed = config.pipeline.seed
    size = config.diffusion.image_size
    for k in range(rounds):
        strength = refine_strength(config, k)
        base = k / rounds

        def sub(fraction: float, message: str, preview: Path | None = None, _base=base) -> None:
            report("refine", _base + fraction / rounds, f"round {k + 1}/{rounds}: {message}", preview)

        check_cancel(cancel)
        renders, _ = fitter.render(cameras.resized(size, size))
        frames = rediffuse(renders, reference, strength, config, seed + k + 1, progress=lambda f, m: sub(0.4 * f, m), cancel=cancel)
        output.evaluations += frames.evaluations
        preview = _save_frames(workdir, f"frames_round{k + 1}.png", frames.images, output)
        sub(0.4, "fitting the re-diffused views", preview)
        fitter.set_targets(frames.images, frames.masks, cameras)
        last = ViewImages(cameras, frames.images, frames.masks)
        started = time.perf_counter()
        stats = _fit(fitter, config.recon.refine_steps, "refine", _SubStage(sub, 0.4, 1.0), workdir, config, cancel, "re-fitting")
        output.metrics.setdefault("refine_rounds", []).append({"strength": strength, "evaluations": frames.evaluations, **stats})
        output.timings[f"refine_round{k + 1}_s"] = time.perf_counter() - started
    return last


class _SubStage:
    """Adapts `_fit`'s (stage, fraction, message, preview) reports into a slice of a round."""

    def __init__(self, sub, start: float, end: float):
        self.sub, self.start, self.end = sub, start, end

    def __call__(self, stage: str, fraction: float, message: str, preview: Path | None = None) -> None:
        self.sub(self.start + (self.end - self.start) * fraction, message, preview)


def generate(request: JobInputs, workdir: Path, config: Config, progress: ProgressFn | None, cancel) -> JobOutput:
    """Prompt or image → reference → orbit video → fit → re-diffusion rounds → mesh."""
    from PIL import Image, UnidentifiedImageError

    from im3d.diffusion import generate_orbit, generate_reference_image, prepare_reference
    from im3d.splats.fit import SplatFitter

    rounds = config.pipeline.refinement_rounds
    stages = ["reference", "orbit", "fit"] + (["refine"] if rounds > 0 else []) + ["mesh", "export"]
    report = StageProgress(stages, progress)
    output = JobOutput()
    device = resolve_device(config.pipeline.device)
    seed = config.pipeline.seed

    # 1. Reference image: the user's, or text-to-image.
    started = time.perf_counter()
    if request.image is not None:
        report("reference", 0.0, "preparing the reference image")
        try:
            with Image.open(request.image) as image:
                reference = prepare_reference(image.convert("RGBA") if image.mode in ("RGBA", "LA", "P") else image.convert("RGB"), config)
        except (UnidentifiedImageError, OSError) as error:
            raise PipelineError("invalid_image", f"the reference image cannot be read: {error}") from None
    else:
        reference = generate_reference_image(
            request.prompt, request.negative_prompt, config, seed,
            progress=lambda f, m: report("reference", f, m), cancel=cancel,
        )
    output.evaluations += reference.evaluations
    if float(reference.mask.max()) < 0.5:
        raise PipelineError("no_object_found", "no object found in the reference image: it looks like plain background; try another prompt or seed")
    reference_png = torch.cat([reference.rgb, reference.mask], dim=-1)
    output.artifacts["reference.png"] = save_png(workdir / "reference.png", reference_png)
    output.timings["reference_s"] = time.perf_counter() - started
    report("reference", 1.0, "reference image ready", workdir / "reference.png")

    # 2. Orbit video.
    started = time.perf_counter()
    frames = generate_orbit(reference, config, seed, progress=lambda f, m: report("orbit", f, m), cancel=cancel)
    output.evaluations += frames.evaluations
    preview = _save_frames(workdir, "frames_round0.png", frames.images, output)
    output.timings["orbit_s"] = time.perf_counter() - started
    report("orbit", 1.0, f"{len(frames.cameras)} orbit frames", preview)
    if float(frames.masks.max()) < 0.5:
        raise PipelineError("no_object_found", "no object found in the orbit video: every frame is background; try another prompt or seed")

    # 3. Fit splats to the frames.
    started = time.perf_counter()
    fitter = SplatFitter(config.recon, frames.cameras, frames.images, frames.masks, device, lpips_model(config, device), seed=config.pipeline.seed)
    output.metrics["fit"] = _fit(fitter, config.recon.steps, "fit", report, workdir, config, cancel, "fitting splats")
    output.timings["fit_s"] = time.perf_counter() - started

    # 4. Refinement rounds.
    views = frames  # the texture comes from the frames the splats were last fitted to
    if rounds > 0:
        views = _rediffusion_rounds(fitter, reference, frames.cameras, rounds, config, request, report, workdir, cancel, output)
    output.metrics["final_fit"] = fitter.evaluate(frames.cameras, frames.images, frames.masks)

    # 5-6. Mesh, texture, artifacts.
    _mesh_and_export(fitter, workdir, config, report, cancel, output, views=views)
    _finish(workdir, config, output)
    return output


def refine(request: JobInputs, workdir: Path, config: Config, progress: ProgressFn | None, cancel) -> JobOutput:
    """Views of an existing object → fit → re-diffuse orbit renders at the chosen strength → fit → mesh."""
    from PIL import Image, UnidentifiedImageError

    from im3d.diffusion import orbit_radius, prepare_reference
    from im3d.splats.fit import SplatFitter

    rounds = max(1, config.pipeline.refinement_rounds)
    report = StageProgress(["load", "fit", "refine", "mesh", "export"], progress)
    output = JobOutput()
    device = resolve_device(config.pipeline.device)
    train, test = _load_views(request, report, config, cancel)

    # The reference: the user's image, else the view closest to the front (azimuth 0, camera on -Y).
    if request.image is not None:
        try:
            with Image.open(request.image) as image:
                reference = prepare_reference(image.convert("RGBA"), config)
        except (UnidentifiedImageError, OSError) as error:
            raise PipelineError("invalid_image", f"the reference image cannot be read: {error}") from None
    else:
        centers = train.cameras.centers()
        front = int(torch.argmin(torch.atan2(centers[:, 0], -centers[:, 1]).abs()))
        rgba = torch.cat([train.composited([1.0, 1.0, 1.0])[front], train.masks[front]], dim=-1)
        reference = prepare_reference(rgba, config)
    output.artifacts["reference.png"] = save_png(workdir / "reference.png", torch.cat([reference.rgb, reference.mask], -1))

    started = time.perf_counter()
    fitter = SplatFitter(config.recon, train.cameras, train.images, train.masks, device, lpips_model(config, device), seed=config.pipeline.seed)
    output.metrics["fit"] = _fit(fitter, config.recon.steps, "fit", report, workdir, config, cancel, "fitting the object's views")
    output.timings["fit_s"] = time.perf_counter() - started

    # The orbit model's cameras, placed around the object where it is in the scene, at its size.
    center, size = _object_extent(fitter)
    d = config.diffusion
    cameras = orbit_cameras(
        d.num_views, elevation_deg=d.elevation_deg, radius=orbit_radius(d.orbit_fov_deg, d.frame_fill, max(size, 1e-3)),
        fov_deg=d.orbit_fov_deg, width=d.image_size, target=tuple(float(x) for x in center),
    )
    # The texture comes from the last round's frames, not the input views: the refined splats (and
    # so the mesh) follow those frames, and the refinement is meant to change the appearance too.
    views = _rediffusion_rounds(fitter, reference, cameras, rounds, config, request, report, workdir, cancel, output)
    if test is not None:
        output.metrics["heldout_original"] = fitter.evaluate(test.cameras, test.images, test.masks)
    _mesh_and_export(fitter, workdir, config, report, cancel, output, views=views)
    _finish(workdir, config, output)
    return output
