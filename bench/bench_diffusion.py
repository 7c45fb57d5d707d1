"""Latency and peak memory of the diffusion stage (orbit video + re-diffusion), random weights.

    backend/.venv/bin/python bench/bench_diffusion.py                 # CUDA: SV3D size; CPU: tiny
    backend/.venv/bin/python bench/bench_diffusion.py --size sv3d --views 21 --image-size 576 --steps 25

Builds the architecture (`im3d.testing.tiny_models.ORBIT_CONFIGS`: "tiny" or SV3D_p's full size) with
random weights, saves it with `save_pretrained(safe_serialization=True)` and runs it through the
product's own path (`generate_orbit`, `rediffuse`: folder lookup, `from_pretrained`, warm cache),
so load time, denoising, decoding and the evaluation count are what a job would see. Random
weights make random pictures; the numbers are about speed and memory only. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from im3d.config import load_config
from im3d.diffusion import models
from im3d.diffusion.foreground import ReferenceImage
from im3d.diffusion.orbit_video import generate_orbit, load_orbit_pipeline, rediffuse
from im3d.testing.tiny_models import build_orbit_pipeline


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, fn):
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, peak_memory_gib(device)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "sv3d"], default="sv3d" if cuda else "tiny")
    parser.add_argument("--views", type=int, default=None, help="frames (default: 21 for sv3d, 4 for tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 576 for sv3d, 64 for tiny")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.5, 0.3], help="re-diffusion rounds")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--decode-chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    full = args.size == "sv3d"
    views = args.views or (21 if full else 4)
    image_size = args.image_size or (576 if full else 64)
    device = models.resolve_device("auto")
    dtype = models.resolve_dtype(args.dtype, device)

    with tempfile.TemporaryDirectory(prefix="im3d-bench-") as tmp:
        folder = Path(tmp) / f"orbit-{args.size}"
        start = time.perf_counter()
        build_orbit_pipeline(args.size, dtype=torch.float16 if full else torch.float32).save_pretrained(
            folder, safe_serialization=True
        )
        build_s = time.perf_counter() - start
        config = load_config(
            overrides={
                "diffusion": {
                    "orbit_model": str(folder),
                    "num_views": views,
                    "image_size": image_size,
                    "orbit_steps": args.steps,
                    "dtype": args.dtype,
                    "cpu_offload": args.cpu_offload,
                    "vae_decode_chunk": args.decode_chunk,
                    "refine_strengths": args.strengths or [0.5],
                }
            }
        )
        _, load_s, _load_mem = timed(device, lambda: load_orbit_pipeline(config))
        unet = load_orbit_pipeline(config).pipeline.unet
        params = sum(p.numel() for p in unet.parameters()) / 1e6

        torch.manual_seed(0)
        reference = ReferenceImage(torch.rand(image_size, image_size, 3), torch.ones(image_size, image_size, 1))
        rows = []
        orbit, seconds, mem = timed(device, lambda: generate_orbit(reference, config, seed=0))
        rows.append(("orbit (s = 1)", args.steps, orbit.evaluations, seconds, mem))
        total_evals, total_s = orbit.evaluations, seconds
        for strength in args.strengths:
            refined, seconds, mem = timed(device, lambda s=strength: rediffuse(orbit.images, reference, s, config, seed=1))
            rows.append((f"re-diffusion s = {strength:g}", None, refined.evaluations, seconds, mem))
            total_evals += refined.evaluations
            total_s += seconds

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    memory = "peak CUDA allocated" if device.type == "cuda" else "process peak RSS"
    print(f"\nOrbit model `{args.size}` ({params:.0f} M UNet parameters, random weights), {views} frames at "
          f"{image_size}², {args.steps} steps, {dtype}, cpu_offload={args.cpu_offload}, decode chunk {args.decode_chunk}, "
          f"on {name}. Built + saved in {build_s:.1f} s; loaded (from_pretrained) in {load_s:.1f} s.\n")
    print(f"| stage | evaluations | seconds | {memory} (GiB) |")
    print("| --- | ---: | ---: | ---: |")
    for stage, _, evals, seconds, mem in rows:
        print(f"| {stage} | {evals} | {seconds:.2f} | {mem:.2f} |")
    print(f"| **asset total** | **{total_evals}** | **{total_s:.2f}** | |")


if __name__ == "__main__":
    main()
