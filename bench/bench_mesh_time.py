"""Meshing time at the *standard* mesh settings, from the fidelity bench's cached fits.

The goal is meshing ≤ 10 s on 2 cores at the standard settings (grid 256, 50k faces, 1024²
texture). Meshes bench/bench_mesh_fidelity.py's cached splats (run that first) with their views
as fitted (16 × 128²) and upsampled to 576² (a generated job's frames), each variant in turn,
interleaved, so the variants share the machine's state; prints the runs, their median and the
stage times of the median run.

    backend/.venv/bin/python bench/bench_mesh_time.py                      # bumpy, mug, bowl; 3 runs
    backend/.venv/bin/python bench/bench_mesh_time.py --variant mesh.fit_outlines=false --runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_mesh_fidelity import DEFAULT_DATA, DEFAULT_WORK  # noqa: E402
from im3d.cameras import read_transforms  # noqa: E402
from im3d.config import load_config  # noqa: E402
from im3d.mesh import mesh_from_splats  # noqa: E402
from im3d.splats.fit import resize_images  # noqa: E402
from im3d.splats.ply import read_ply  # noqa: E402

GENERATED_SIZE = 576  # SV3D's frames


def upsampled(views, size: int):
    """The views at size² (cameras rescaled, images and masks resampled as the fit resamples them)."""
    return dataclasses.replace(
        views, cameras=views.cameras.resized(size, size), images=resize_images(views.images, size), masks=resize_images(views.masks, size)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", default="bumpy,mug,bowl", help="cached fits to mesh (comma-separated)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--runs", type=int, default=3, help="runs per object, size and variant")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE", help="a variant's override, run beside the defaults (repeatable: one variant each)")
    args = parser.parse_args(argv)
    variants = {"defaults": []} | {v: [v] for v in args.variant}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {load:.1f} before the runs")
    print("\n| object, views | variant | runs (s) | median (s) | stages of the median run (s) |\n| --- | --- | --- | ---: | --- |")
    for name in args.objects.split(","):
        splats = read_ply(args.work / name / "splats.ply")
        fitted = read_transforms(args.data / name, "train")
        for size in (fitted.cameras.width, GENERATED_SIZE):
            views = fitted if size == fitted.cameras.width else upsampled(fitted, size)
            runs: dict[str, list[tuple[float, dict]]] = {label: [] for label in variants}
            for _ in range(args.runs):
                for label, assignments in variants.items():  # interleaved
                    config = load_config("standard", assignments=assignments)
                    start = time.perf_counter()
                    result = mesh_from_splats(splats, config.mesh, views=views)
                    runs[label].append((time.perf_counter() - start, result.report.stage_seconds))
            for label, timed in runs.items():
                seconds = [s for s, _ in timed]
                median_run = timed[int(np.argsort(seconds)[len(seconds) // 2])]
                stages = ", ".join(f"{k} {v:.1f}" for k, v in median_run[1].items())
                print(f"| {name}, {len(fitted.cameras)} × {size}² | {label} | {', '.join(f'{s:.1f}' for s in seconds)} | **{np.median(seconds):.1f}** | {stages} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
