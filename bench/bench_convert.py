"""Time and peak memory of converting a full-size SV3D checkpoint (random weights).

    backend/.venv/bin/python bench/bench_convert.py                       # sv3d_p, fp32 (9.4 GB)
    backend/.venv/bin/python bench/bench_convert.py --variant sv3d_u --dtype float16 --workdir /tmp/x

Writes a checkpoint with exactly the tensor names and shapes of Stability's `sv3d_p.safetensors`
(the committed manifest, tests/fixtures/sv3d_manifest.json.gz) and N(0, 0.02) values, streamed one
tensor at a time, then converts it with `convert_sv3d_checkpoint` in a child process whose memory
is sampled from /proc every 0.1 s (RSS, and its anonymous part: memory the process owns, as
opposed to file pages of the memory-mapped checkpoint the kernel can drop at any time), then
times `verify_pipeline_folder` on the result. Prints a Markdown table; deletes the files unless --keep.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

import torch  # noqa: E402

from im3d.testing.tiny_models import write_sgm_checkpoint  # noqa: E402

CHILD = """
import sys, time
from im3d.diffusion.convert_sv3d import convert_sv3d_checkpoint, verify_pipeline_folder
t = time.perf_counter()
if sys.argv[1] == "convert":
    dtype = None if sys.argv[4] == "keep" else getattr(__import__("torch"), sys.argv[4])
    convert_sv3d_checkpoint(sys.argv[2], sys.argv[3], dtype=dtype)
else:
    problems = verify_pipeline_folder(sys.argv[2])
    assert problems == [], problems
print(f"ELAPSED {time.perf_counter() - t:.2f}")
"""


def run_sampled(args: list[str]) -> dict[str, float]:
    """Run a child python, sampling its memory; wall time, in-child time, CPU time, peaks (GiB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "backend"))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True, env=env)
    peaks = {"rss": 0.0, "anon": 0.0}

    def sample() -> None:
        status = Path(f"/proc/{child.pid}/status")
        while child.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                peaks["rss"] = max(peaks["rss"], int(fields["VmRSS"].split()[0]) / 2**20)
                peaks["anon"] = max(peaks["anon"], int(fields.get("RssAnon", "0 kB").split()[0]) / 2**20)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    out = child.stdout.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"child failed ({child.returncode}): {out}")
    inner = float(next(line.split()[1] for line in out.splitlines() if line.startswith("ELAPSED")))
    return {"wall": wall, "inner": inner, "cpu": usage.ru_utime + usage.ru_stime, "maxrss": usage.ru_maxrss / 2**20, **peaks}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["sv3d_p", "sv3d_u"], default="sv3d_p")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the checkpoint written (Stability's: float32)")
    parser.add_argument("--out-dtype", choices=["keep", "float16", "bfloat16"], default="keep", help="dtype the converter writes")
    parser.add_argument("--workdir", default="/tmp/im3d-bench-convert")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    manifest = json.loads(gzip.open(ROOT / "tests" / "fixtures" / "sv3d_manifest.json.gz").read())
    shapes = {k: tuple(v) for k, v in manifest["checkpoints"][args.variant].items()}
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, out = work / f"{args.variant}.safetensors", work / args.variant
    try:
        t = time.perf_counter()
        write_sgm_checkpoint(src, shapes, size="full", dtype=getattr(torch, args.dtype))
        write_s = time.perf_counter() - t
        convert = run_sampled(["convert", str(src), str(out), args.out_dtype])
        verify = run_sampled(["verify", str(out)])
        load = os.getloadavg()
        gib = 2**30
        print(f"\nSV3D conversion, {args.variant} shape ({len(shapes)} tensors), random weights; "
              f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} during the run\n")  # fmt: skip
        print("| step | input | output | wall s | CPU s | peak RSS GiB | peak anon GiB |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        print(f"| write checkpoint | - | {src.stat().st_size / gib:.2f} GiB {args.dtype} | {write_s:.0f} | - | - | - |")
        print(f"| convert | {src.stat().st_size / gib:.2f} GiB | {folder_bytes(out) / gib:.2f} GiB ({args.out_dtype}) "
              f"| {convert['inner']:.0f} | {convert['cpu']:.0f} | {convert['maxrss']:.2f} | {convert['anon']:.2f} |")  # fmt: skip
        print(f"| verify (headers + meta device) | {folder_bytes(out) / gib:.2f} GiB | - | {verify['inner']:.1f} "
              f"| {verify['cpu']:.0f} | {verify['maxrss']:.2f} | {verify['anon']:.2f} |")  # fmt: skip
        print("\nwall s is inside the child (imports excluded); peak RSS counts the memory-mapped checkpoint's file pages, "
              "peak anon only the process's own memory.")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
