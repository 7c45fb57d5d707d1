"""Rasterizer backends: forward and forward+backward time, speed-up, peak memory.

    backend/.venv/bin/python bench/bench_rasterizer.py [--no-write] [--sizes 10000x16x128 2000x4x64]

Each (backend, size) runs in a fresh subprocess so that its peak RSS is its own. Prints a
markdown table and writes it into the "Rasterizer" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks_doc import replace_section

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Rasterizer"


def make_scene(n: int, views: int, size: int, sh_degree: int = 3):
    import torch

    from im3d.cameras import orbit_cameras

    g = torch.Generator().manual_seed(0)
    # An object-sized cloud like the fitting loop sees mid-way: ~1 m across, 1-4 cm splats.
    means = torch.randn(n, 3, generator=g) * 0.25
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.03 + 0.01
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    cams = orbit_cameras(views, elevation_deg=15.0, radius=2.2, fov_deg=40.0, width=size, height=size)
    backgrounds = torch.ones(views, 3)
    return (means, quats, scales, opacities, colors, cams.viewmats, cams.Ks, size, size), sh_degree, backgrounds


def worker(backend: str, n: int, views: int, size: int, repeats: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)  # also the CPU backend's kernel threads

    from im3d.splats.raster import rasterize

    device = "cuda" if backend == "gsplat" else "cpu"
    scene, sh_degree, backgrounds = make_scene(n, views, size)
    scene = [t.to(device) if torch.is_tensor(t) else t for t in scene]
    backgrounds = backgrounds.to(device)
    params = [t.clone().requires_grad_(True) for t in scene[:5]]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(backward: bool) -> tuple[float, float]:
        for p in params:
            p.grad = None
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        colors, alphas, info = rasterize(
            *params, *scene[5:], sh_degree=sh_degree, backgrounds=backgrounds, backend=backend
        )
        if backward:
            info["means2d"].retain_grad()
            (colors.square().mean() + alphas.mean()).backward()
        sync()
        return time.perf_counter() - start, time.process_time() - start_cpu

    step(True)  # warm-up: numba load/compile, CUDA context, lazy imports
    forward = min(step(False)[0] for _ in range(repeats))
    forward_backward, forward_backward_cpu = min(step(True) for _ in range(repeats))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_gpu = None
    return dict(backend=backend, n=n, views=views, size=size, forward_ms=forward * 1e3,
                forward_backward_ms=forward_backward * 1e3,
                forward_backward_cpu_s=forward_backward_cpu, peak_rss_mib=peak_kib / 1024,
                peak_gpu_mib=peak_gpu, threads=torch.get_num_threads())  # fmt: skip


def run_worker(backend: str, n: int, views: int, size: int, repeats: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, f"{n}x{views}x{size}", "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"  running {backend} at {n} Gaussians, {views} views x {size}^2 ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    lines = [
        "| backend | Gaussians | views | resolution | forward ms | forward+backward ms | speed-up vs torch (fwd+bwd) | fwd+bwd CPU time s | peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = next((x for x in rows if x["backend"] == "torch" and (x["n"], x["views"], x["size"]) == (r["n"], r["views"], r["size"])), None)
        speedup = f"{ref['forward_backward_ms'] / r['forward_backward_ms']:.1f}x" if ref else "n/a"
        rss = f"{r['peak_rss_mib']:.0f}" + (f" (GPU {r['peak_gpu_mib']:.0f})" if r.get("peak_gpu_mib") else "")
        lines.append(
            f"| {r['backend']} | {r['n']} | {r['views']} | {r['size']}x{r['size']} | {r['forward_ms']:.0f} | "
            f"{r['forward_backward_ms']:.0f} | {speedup} | {r['forward_backward_cpu_s']:.2f} | {rss} |"
        )
    return "\n".join(lines)


def write_section(body: str) -> None:
    replace_section(f"{SECTION}\n\n{body.strip()}\n", DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10000x16x128", "2000x4x64"], help="NxVIEWSxRES")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the minimum is kept)")
    parser.add_argument(
        "--reference-repeats", type=int, default=1,
        help="timed runs for the torch reference at sizes over 1e9 pixel-Gaussian pairs (it takes minutes there)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch + kernel threads (default: torch's); 1 is steadier on a machine busy with other jobs",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help=f"only print, do not update {DOC.relative_to(REPO)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("worker_size", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        n, views, size = map(int, args.worker_size.split("x"))
        print(json.dumps(worker(args.worker, n, views, size, args.repeats, args.threads)))
        return

    import torch

    backends = ["torch", "cpu"] + (["gsplat"] if torch.cuda.is_available() else [])
    rows = []
    for spec in args.sizes:
        n, views, size = map(int, spec.split("x"))
        for backend in backends:
            big = n * views * size * size > 1e9
            repeats = args.reference_repeats if backend == "torch" and big else args.repeats
            rows.append(run_worker(backend, n, views, size, repeats, args.threads))
    threads = rows[0]["threads"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (
        f"`bench/bench_rasterizer.py` ({time.strftime('%Y-%m-%d')}): SH degree 3, white background, loss on colours "
        f"and alphas; best of {args.repeats} runs ({args.reference_repeats} for the torch reference at 10k Gaussians) after a "
        f"warm-up; "
        f"each row in its own process. Machine: {machine()}; {threads} torch/kernel threads; load average "
        f"at the end {load} (other jobs share this machine, so timings are pessimistic). Peak RSS is the "
        "whole process (torch and numba included); CPU time sums all threads of the fastest fwd+bwd run and "
        "is less sensitive to the load than wall time. The torch reference checkpoints crowded tiles, so its "
        "backward pass recomputes their forward.\n\n"
        + table(rows)
    )
    print(body)
    if not args.no_write:
        write_section(body)
        print(f"\nwritten to {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
