"""Blender-side timings: result import, Refine Selected's turntable, main-thread stalls while a job runs.

    backend/.venv/bin/python bench/bench_blender.py

Uses the real bpy module, the add-on package from this checkout and a real backend process
(python -m im3d.server) whose runner only reports progress (the pipeline's own speed is benchmarked
elsewhere): what is measured here is what the artist's Blender does.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="im3d-bench-user-"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bpy  # noqa: E402  (first: addon_utils comes with it)
import addon_utils  # noqa: E402
import numpy as np  # noqa: E402
import trimesh  # noqa: E402
from PIL import Image  # noqa: E402

from im3d_blender import importer, local_backend, paths, runtime, turntable  # noqa: E402


def textured_glb(path: Path, triangles: int = 100_000, texture: int = 1024) -> int:
    side = int((triangles / 4) ** 0.5)  # a UV sphere of count [n, n] has about 4 n² triangles
    mesh = trimesh.creation.uv_sphere(radius=0.5, count=[side, side])
    uv = np.random.default_rng(0).random((len(mesh.vertices), 2))
    image = Image.fromarray((np.random.default_rng(1).random((texture, texture, 3)) * 255).astype(np.uint8))
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    mesh.export(path)
    return len(mesh.faces)


def bench_import(folder: Path, repeats: int = 3) -> tuple[int, float]:
    path = folder / "big.glb"
    faces = textured_glb(path)
    times = []
    for i in range(repeats):
        bpy.ops.wm.read_homefile(use_factory_startup=True)
        start = time.perf_counter()
        importer.import_result(path, name=f"big {i}", provenance={"job_id": "bench"}, location=(0, 0, 0))
        times.append(time.perf_counter() - start)
    return faces, statistics.median(times)


def bench_turntable(folder: Path, views: int = 16, size: int = 256, samples: int = 16) -> float:
    bpy.ops.wm.read_homefile(use_factory_startup=True)
    bpy.ops.mesh.primitive_monkey_add()
    monkey = bpy.context.active_object
    monkey.modifiers.new("subdivision", "SUBSURF").levels = 2
    start = time.perf_counter()
    turntable.render_turntable([monkey], folder / "turntable", num_views=views, size=size, samples=samples)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_stall(folder: Path, seconds: float = 8.0) -> tuple[float, float, int]:
    """Longest and median `runtime.pump` call (the timer callback) while a job runs on a real backend."""
    bpy.ops.wm.read_homefile(use_factory_startup=True)
    prefs = paths.preferences()
    prefs.python_path, prefs.port, prefs.device = sys.executable, free_port(), "cpu"
    process = local_backend.local_process(prefs)
    process.extra_args = ["--runner", "blender_slow_runner:run"]
    process.extra_env = {"PYTHONPATH": str(ROOT / "tests")}
    process.start()
    process.wait_ready(60)
    try:
        scene = bpy.context.scene
        scene.im3d.prompt = "a benchmark teapot"
        bpy.ops.im3d.generate(asynchronous=True)
        durations = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            runtime.pump()
            durations.append(time.perf_counter() - start)
            time.sleep(0.1)  # the timer's interval
        bpy.ops.im3d.cancel()
        while runtime.Jobs.active is not None:
            runtime.pump()
            time.sleep(0.05)
    finally:
        local_backend.stop_backend()
    return max(durations), statistics.median(durations), len(durations)


def main() -> int:
    addon_utils.enable("im3d_blender", default_set=True)  # the checkout's package, as a legacy add-on
    folder = Path(tempfile.mkdtemp(prefix="im3d-bench-"))
    rows = []
    faces, seconds = bench_import(folder)
    rows.append((f"import a {faces:,}-triangle textured result (1024² texture)", f"{seconds:.3f} s", "≤ 0.5 s"))
    seconds = bench_turntable(folder)
    rows.append(("Refine Selected turntable: 16 views at 256², Cycles CPU 16 spp", f"{seconds:.2f} s ({seconds / 16:.2f} s/view)", "-"))
    longest, median, count = bench_stall(folder)
    rows.append((f"main-thread stall while a job runs (longest of {count} timer ticks)", f"{longest * 1000:.2f} ms (median {median * 1000:.2f} ms)", "≤ 20 ms"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | result | target |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for row in rows:
        print(f"| {row[0]:<{width}} | {row[1]} | {row[2]} |")
    addon_utils.disable("im3d_blender", default_set=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
