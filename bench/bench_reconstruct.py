"""Reconstruction benchmark: fit Gaussians to Blender-rendered ground truth, score held-out views.

For each object x preset x rasterizer backend x initialisation, fits `SplatFitter` to the 16 orbit
views of a ground-truth dataset (`bench/render_datasets.py`, cached in `out/bench_data/`) and scores
the 8 held-out views off the orbit (PSNR / SSIM over the background, mask IoU). Each run is a fresh
child process, so its peak RSS is its own. Prints a markdown table (and writes it with `--markdown`).

    backend/.venv/bin/python bench/bench_reconstruct.py                       # full: fast + standard, cpu
    backend/.venv/bin/python bench/bench_reconstruct.py --quick --backends cpu,torch
    backend/.venv/bin/python bench/bench_reconstruct.py --objects suzanne --presets fast --steps 150

No LPIPS backbone weights exist offline, so by default LPIPS is replaced by L1
(`recon.lpips_weight=0`, `recon.l1_weight=1`). `--lpips random` keeps the paper's LPIPS term with a
randomly initialised backbone saved into a temporary torch hub cache: those rows measure the cost
of the LPIPS path only, their quality numbers mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "out" / "bench_data"
QUICK_STEPS = {"fast": 100, "standard": 150, "high": 150}
# Issue 3's targets on a 2-core CPU at 128^2: held-out PSNR (dB) and wall seconds.
TARGETS = {"fast": (26.0, 60.0), "standard": (28.0, None)}


# ----------------------------------------------------------------------------------------------
# 1. data


def ensure_dataset(data_dir: Path, name: str, size: int) -> Path:
    """out/bench_data/<name> with train + test splits, rendered with bpy when missing."""
    folder = data_dir / name
    if (folder / "transforms_train.json").is_file() and (folder / "transforms_test.json").is_file():
        meta = json.loads((folder / "transforms_train.json").read_text())
        w = meta.get("w") or _first_image_width(folder)
        if w == size:
            return folder
        print(f"[bench] {folder} was rendered at {w} px, re-rendering at {size}", file=sys.stderr)
    print(f"[bench] rendering ground truth for {name} at {size}^2 into {data_dir}", file=sys.stderr)
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "render_datasets.py"), "--out", str(data_dir), "--size", str(size), "--objects", name],
        check=True, stdout=subprocess.DEVNULL,
    )
    return folder


def _first_image_width(folder: Path) -> int:
    from PIL import Image

    with Image.open(next((folder / "train").glob("*.png"))) as image:
        return image.width


def random_lpips_home(net: str) -> Path:
    """A temporary TORCH_HOME whose hub cache holds a randomly initialised torchvision backbone."""
    import torch
    import torchvision

    from im3d.splats.losses import BACKBONE_FILES

    home = Path(tempfile.mkdtemp(prefix="im3d-bench-torchhome-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    model = torchvision.models.vgg16() if net == "vgg" else torchvision.models.alexnet()
    features = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    torch.save(features, checkpoints / BACKBONE_FILES[net][0])
    return home


# ----------------------------------------------------------------------------------------------
# 2. one run (in a child process)


def run_one(spec: dict) -> dict:
    import torch

    from im3d.cameras import read_transforms
    from im3d.config import load_config
    from im3d.splats.fit import SplatFitter

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    assignments = [
        f"recon.backend={spec['backend']}",
        f"recon.init={spec['init']}",
        f"recon.image_size={spec['size']}",  # fit at the dataset's resolution, never upsampled
        *spec["assignments"],
    ]
    if spec["lpips"] == "off":
        assignments += ["recon.lpips_weight=0", "recon.l1_weight=1"]
    config = load_config(spec["preset"], assignments=assignments).recon
    steps = spec["steps"] or config.steps
    train = read_transforms(spec["data"], "train")
    test = read_transforms(spec["data"], "test")

    start = time.perf_counter()
    fitter = SplatFitter(config, train.cameras, train.images, train.masks, device="cpu")
    init_s = time.perf_counter() - start
    fit_start = time.perf_counter()
    first_step_s = [0.0]

    def on_step(info):
        if info.step == 1:
            first_step_s[0] = time.perf_counter() - fit_start

    result = fitter.fit(steps, on_step=on_step)
    wall_s = time.perf_counter() - start
    scores = fitter.evaluate(test.cameras, test.images, test.masks)
    return {
        **{k: spec[k] for k in ("object", "preset", "backend", "init", "lpips")},
        "steps": steps,
        "views_per_step": config.views_per_step or len(train.cameras),
        **scores,
        "gaussians": fitter.num_gaussians,
        "init_s": init_s,
        "fit_s": result.seconds,
        "wall_s": wall_s,
        "steps_per_s": steps / result.seconds,
        # the first step includes any numba JIT compile that the on-disk cache did not cover
        "steady_steps_per_s": (steps - 1) / max(result.seconds - first_step_s[0], 1e-9) if steps > 1 else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "final_loss": result.final_loss,
    }


def run_in_child(spec: dict, env: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--run-one", json.dumps(spec)], env=env, capture_output=True, text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# 3. table


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| object | preset | backend | init | loss | steps | held-out PSNR (dB) | SSIM | mask IoU | Gaussians | wall (s) | steps/s | steps/s after step 1 | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    loss_names = {"off": "L1 + MS-SSIM + mask (no LPIPS)", "random": "LPIPS (random backbone, timing only)"}
    for r in rows:
        lines.append(
            f"| {r['object']} | {r['preset']} | {r['backend']} | {r['init']} | {loss_names[r['lpips']]} | {r['steps']} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {r['mask_iou']:.3f} | {r['gaussians']:,} | {r['wall_s']:.1f} "
            f"| {r['steps_per_s']:.2f} | {r['steady_steps_per_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def init_comparison(rows: list[dict]) -> str:
    """Mean held-out PSNR / IoU of center vs visual_hull over the runs that have both."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["object"], r["preset"], r["backend"], r["lpips"], r["steps"]), {})[r["init"]] = r
    pairs = [v for v in by_key.values() if "center" in v and "visual_hull" in v]
    if not pairs:
        return ""
    lines = ["| init | runs | mean PSNR (dB) | mean mask IoU | mean wall (s) |", "| --- | ---: | ---: | ---: | ---: |"]
    for init in ("center", "visual_hull"):
        runs = [p[init] for p in pairs]
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        lines.append(f"| {init} | {len(runs)} | {mean('psnr'):.2f} | {mean('mask_iou'):.3f} | {mean('wall_s'):.1f} |")
    return "\n".join(lines)


def target_notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        target = TARGETS.get(r["preset"])
        if target is None or r["lpips"] != "off":
            continue
        psnr_target, time_target = target
        psnr_ok = "meets" if r["psnr"] >= psnr_target else f"misses by {psnr_target - r['psnr']:.2f} dB"
        text = f"{r['object']} {r['preset']} {r['backend']} {r['init']} ({r['steps']} steps): PSNR {psnr_ok} (target ≥ {psnr_target:g} dB)"
        if time_target is not None:
            time_ok = "meets" if r["wall_s"] <= time_target else f"misses by {r['wall_s'] - time_target:.0f} s"
            text += f"; time {time_ok} (target ≤ {time_target:g} s)"
        notes.append(text)
    return notes


# ----------------------------------------------------------------------------------------------
# 4. main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", default="suzanne,mug,rounded_box", help="comma-separated objects of bench/render_datasets.py")
    parser.add_argument("--presets", default="fast,standard", help="comma-separated config presets")
    parser.add_argument("--backends", default="cpu", help="comma-separated rasterizer backends: cpu, torch (torch only with --quick or --steps)")
    parser.add_argument("--inits", default="center,visual_hull", help="comma-separated recon.init values to compare")
    parser.add_argument("--steps", type=int, default=0, help="optimisation steps of every run (0: the preset's, or --quick's)")
    parser.add_argument("--quick", action="store_true", help=f"short fits: {QUICK_STEPS} steps")
    parser.add_argument("--size", type=int, default=128, help="ground-truth image side (the fits run at this size)")
    parser.add_argument("--lpips", choices=["off", "random"], default="off", help="off: L1 replaces LPIPS; random: LPIPS with a random backbone (timing only)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where ground-truth datasets are cached")
    parser.add_argument("--set", action="append", default=[], metavar="recon.KEY=VALUE", help="extra config assignments")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--from-json", type=Path, help="re-print the tables of rows saved by an earlier --markdown run (its .json)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0

    if args.from_json:
        print(report(json.loads(args.from_json.read_text())))
        return 0

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    objects, presets, backends, inits = split(args.objects), split(args.presets), split(args.backends), split(args.inits)
    bad_backends = [b for b in backends if b not in ("cpu", "torch")]
    if bad_backends:
        parser.error(f"unknown backend(s) {', '.join(bad_backends)}; this CPU benchmark runs cpu and torch")
    if "torch" in backends and not (args.quick or args.steps):
        parser.error("the torch reference backend is too slow for full-length fits; add --quick or --steps N")

    env = dict(os.environ)
    if args.lpips == "random":
        net_of = {p: __import__("im3d.config", fromlist=["load_config"]).load_config(p).recon.lpips_net for p in presets}
        home = None
        for net in sorted(set(net_of.values())):
            home = random_lpips_home(net) if home is None else _add_backbone(home, net)
        env["TORCH_HOME"] = str(home)

    rows = []
    for name in objects:
        data = ensure_dataset(args.data, name, args.size)
        for preset in presets:
            for backend in backends:
                for init in inits:
                    spec = {
                        "object": name, "preset": preset, "backend": backend, "init": init, "lpips": args.lpips,
                        "data": str(data), "size": args.size, "threads": args.threads, "assignments": args.set,
                        "steps": args.steps or (QUICK_STEPS.get(preset, 100) if args.quick else 0),
                    }
                    row = run_in_child(spec, env)
                    rows.append(row)
                    print(
                        f"[bench] {name} {preset} {backend} {init}: {row['psnr']:.2f} dB, IoU {row['mask_iou']:.3f}, "
                        f"{row['wall_s']:.1f} s, {row['steps_per_s']:.2f} steps/s", file=sys.stderr, flush=True,
                    )

    text = report(rows)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
        args.markdown.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


def report(rows: list[dict]) -> str:
    text = markdown_table(rows)
    comparison = init_comparison(rows)
    if comparison:
        text += "\n\nInitialisation, averaged over matching runs:\n\n" + comparison
    notes = target_notes(rows)
    if notes:
        text += "\n\nAgainst the targets (fast ≥ 26 dB in ≤ 60 s, standard ≥ 28 dB):\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def _add_backbone(home: Path, net: str) -> Path:
    other = random_lpips_home(net)
    for file in (other / "hub" / "checkpoints").iterdir():
        file.rename(home / "hub" / "checkpoints" / file.name)
    return home


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "backend"))
    sys.exit(main())
