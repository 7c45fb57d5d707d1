"""What a job will need in memory, checked against what the machine has before the job starts.

The estimate is deliberately simple: a sum of the few terms that grow with settings (pixels fitted
per step, Gaussians, density grid, texture) and with the inputs (one image decoded at a time). Its
constants were measured with bench/bench_memory.py on the CPU backend and rounded up. A job whose
estimate does not fit fails at once with `out_of_memory`, naming the setting that costs most,
instead of being ended by the kernel's OOM killer half-way (which may pick Blender instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from im3d.config import Config
from im3d.errors import Im3dError

GIB = float(1 << 30)
# Bytes per fitted pixel per view rendered in one step (activations kept for the backward pass).
RASTER_BYTES_PER_PX = 400  # rasterizer buffers + MS-SSIM pyramid + mask loss
LPIPS_BYTES_PER_PX = {"vgg": 3200, "alex": 700}
TARGET_BYTES_PER_PX = 64  # targets, masks and their composites, float32, per view
GAUSSIAN_FLOATS = 14  # means 3, quats 4, scales 3, opacity 1, sh0 3 (+ 3 per higher SH coefficient)
GAUSSIAN_COPIES = 6  # parameter, gradient, two Adam moments, the rollback snapshot, strategy state
GRID_BYTES_PER_VOXEL = 24  # density/TSDF + weights + cavity labels + marching-cubes scratch
TEXTURE_BYTES_PER_TEXEL = 64  # float accumulators, weights, padding scratch
DECODE_BYTES_PER_PX = 12  # one input image: RGBA uint8 + premultiplied copy + resized output
HEADROOM = 0.85  # share of the available memory a job may plan to use


@dataclass
class Estimate:
    terms: dict[str, float]  # setting to lower -> bytes it accounts for
    on_device: dict[str, float]  # the part that lives on the accelerator (empty on the CPU)

    @property
    def host_bytes(self) -> float:
        return sum(v for k, v in self.terms.items() if k not in self.on_device)

    @property
    def device_bytes(self) -> float:
        return sum(self.on_device.values())


def input_views(views: Path | None) -> tuple[int, int]:
    """(frame count, pixels of the largest image) of a dataset, from its JSON and image headers."""
    if views is None:
        return 0, 0
    from PIL import Image

    root = Path(views)
    json_path = root if root.is_file() else next((root / n for n in ("transforms.json", "transforms_train.json") if (root / n).is_file()), None)
    if json_path is None:
        return 0, 0
    try:
        frames = json.loads(json_path.read_text(encoding="utf-8")).get("frames") or []
        first = json_path.parent / str(frames[0]["file_path"])
        if not first.suffix:
            first = first.with_suffix(".png")
        with Image.open(first) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - a broken dataset is reported by the loader with its own code
        return 0, 0
    return len(frames), width * height


def estimate(config: Config, kind: str, views: Path | None, device_type: str = "cpu") -> Estimate:
    r, m, d = config.recon, config.mesh, config.diffusion
    count, input_px = input_views(views)
    if kind == "generate":
        count = d.num_views
    count = max(count, 1)
    fit_px = r.image_size * r.image_size
    per_step = count if r.views_per_step == 0 else min(r.views_per_step, count)
    lpips = LPIPS_BYTES_PER_PX[r.lpips_net] if r.lpips_weight > 0 else 0
    gaussian_bytes = r.max_gaussians * (GAUSSIAN_FLOATS + 3 * ((r.sh_degree + 1) ** 2 - 1)) * 4 * GAUSSIAN_COPIES
    terms = {
        "recon.image_size": count * fit_px * TARGET_BYTES_PER_PX,
        "recon.views_per_step": per_step * fit_px * (RASTER_BYTES_PER_PX + lpips),
        "recon.max_gaussians": gaussian_bytes,
        "mesh.grid_resolution": float(m.grid_resolution) ** 3 * GRID_BYTES_PER_VOXEL,
        "mesh.texture_size": float(m.texture_size) ** 2 * TEXTURE_BYTES_PER_TEXEL if m.bake_texture else 0.0,
        "the input images' size (downscale the views)": input_px * DECODE_BYTES_PER_PX,
    }
    on_device = {}
    if device_type != "cpu":
        on_device = {k: terms[k] for k in ("recon.image_size", "recon.views_per_step", "recon.max_gaussians")}
    return Estimate(terms, on_device)


def available_bytes() -> float:
    """Memory the job can still take on this machine (RAM, not counting reclaimable caches)."""
    import psutil

    return float(psutil.virtual_memory().available)


def device_available_bytes(device_type: str) -> float | None:
    if device_type != "cuda":
        return None  # MPS shares the host's memory; the host check covers it
    import torch

    free, _ = torch.cuda.mem_get_info()
    return float(free)


def check_memory(config: Config, kind: str, views: Path | None, device_type: str = "cpu") -> Estimate:
    """Raise `out_of_memory` (naming the setting to lower) when the job cannot fit; else the estimate."""
    est = estimate(config, kind, views, device_type)
    checks = [("memory", est.host_bytes, available_bytes(), {k: v for k, v in est.terms.items() if k not in est.on_device})]
    device_free = device_available_bytes(device_type)
    if device_free is not None:
        checks.append((f"{device_type} memory", est.device_bytes, device_free, est.on_device))
    for what, needed, free, terms in checks:
        if needed > HEADROOM * free:
            setting, share = max(terms.items(), key=lambda item: item[1])
            raise Im3dError(
                "out_of_memory",
                f"this job needs about {needed / GIB:.1f} GiB of {what} but {free / GIB:.1f} GiB are available; "
                f"lower {setting} (it accounts for {share / GIB:.1f} GiB) or use the fast preset",
            )
    return est
