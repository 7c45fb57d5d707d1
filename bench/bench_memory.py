"""Peak memory of a reconstruct job vs the resolution of its input views (issue #13).

16 RGBA views at 256² ... 2048² are fitted at recon.image_size=128 (3 steps, no LPIPS, a small
mesh: the point is what the inputs cost, not the fit). Each job runs in its own process, which
reports its own peak RSS, so runs do not share a high-water mark. `--code` points at another
checkout's backend/ folder to measure the code before a change the same way.

    backend/.venv/bin/python bench/bench_memory.py [--code /path/to/backend] [--sizes 256 512 1024 2048]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = """
import resource, sys
from im3d.cli import main
code = main(["reconstruct", sys.argv[1], "--out", sys.argv[2], "--preset", "fast", "--device", "cpu",
             "--set", "recon.image_size=128", "--set", "recon.steps=3", "--set", "recon.lpips_weight=0",
             "--set", "mesh.grid_resolution=32", "--set", "mesh.texture_size=64", "--set", "mesh.face_budget=1000",
             "--set", "pipeline.preview_every=1000"])
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "EXIT", code)
"""


def make_views(root: Path, side: int, count: int = 16) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(HERE.parent / "backend"))
    from im3d.cameras import orbit_cameras, write_transforms

    cams = orbit_cameras(count, elevation_deg=20.0, radius=3.0, fov_deg=40.0, width=side)
    yy, xx = np.mgrid[0:side, 0:side]
    disc = (((xx - side / 2) ** 2 + (yy - side / 2) ** 2) < (side / 3) ** 2).astype(np.uint8) * 255
    noise = np.random.default_rng(0).integers(0, 40, (side, side), dtype=np.uint8)
    rgba = np.dstack([disc // 2 + noise, disc // 3 + noise, 255 - disc, disc]).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rgba).save(root / "images" / f"{i:03d}.png", compress_level=1)
    write_transforms(root / "transforms.json", cams, [f"./images/{i:03d}.png" for i in range(count)])


def measure(code_root: Path, views: Path, out: Path) -> tuple[int, int, float]:
    env = {"PYTHONPATH": str(code_root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", RUN, str(views), str(out)], capture_output=True, text=True, env=env, timeout=1800)
    words = run.stdout.split()
    if "PEAK_MB" not in words:
        raise SystemExit(f"the job did not report: {run.stderr[-2000:]}")
    return int(words[words.index("PEAK_MB") + 1]), int(words[words.index("EXIT") + 1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=Path, default=HERE.parent / "backend", help="backend/ folder whose im3d is measured")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = parser.parse_args()
    print(f"code: {args.code}")
    print("| input views | input pixels | peak RSS (MB) | exit | wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            views = Path(tmp) / f"views{side}"
            make_views(views, side)
            peak, code, wall = measure(args.code.resolve(), views, Path(tmp) / f"out{side}")
            print(f"| 16 x {side}² | {16 * side * side / 1e6:.1f} M | {peak} | {code} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
