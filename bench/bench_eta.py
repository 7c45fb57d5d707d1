"""How well the panel's ETA converges, on the real main job (Refine Selected on Suzanne, diffusion off).

Runs the job twice through the installed extension, pumping `runtime.pump` as Blender's timer would,
and records at every pump the predicted total (elapsed + ETA) against the real total. The first run
has no measured speeds (a fresh user folder); the second uses what the first measured. The status
samples of each run are written to `--timeline` (to compare with the shapes tests/test_blender_eta.py replays).

    backend/.venv/bin/python bench/bench_eta.py [--timeline tests/fixtures/eta_refine_timeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def run_once(bpy, runtime, original, overrides) -> dict:
    state = bpy.context.scene.im3d
    state.preset, state.refine_use_diffusion, state.keep_original = "FAST", False, True
    state.advanced_overrides = json.dumps(overrides)
    for obj in bpy.context.scene.objects:
        obj.select_set(obj == original)
    bpy.context.view_layer.objects.active = original
    start = time.monotonic()
    assert bpy.ops.im3d.refine_selected(asynchronous=True) == {"FINISHED"}
    flow = runtime.Jobs.active
    predictions, samples, seen = [], [], 0
    while runtime.Jobs.active is not None:
        runtime.pump()
        now = time.monotonic()
        remaining = flow._remaining(now)
        if remaining is not None:
            predictions.append((now - start, now - start + remaining))
        if flow.eta is not None and len(flow.eta.history) > seen:
            samples += [(t - start, stage, p) for t, stage, p in flow.eta.history[seen:]]
            seen = len(flow.eta.history)
        time.sleep(0.05 if flow.phase == "turntable" else 0.25)
    total = time.monotonic() - start
    if flow.outcome != "finished":
        raise RuntimeError(f"the job ended {flow.outcome}: {flow.error}")
    late = [abs(p - total) / total for t, p in predictions if t >= total / 4]
    return {"total_s": total, "worst_error_after_quarter": max(late) if late else None, "predictions": predictions, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeline", type=Path, help="write the recorded status samples here (JSON)")
    parser.add_argument("--overrides", help='JSON config overrides instead of the demo\'s, e.g. {"recon": {"steps": 100}}')
    args = parser.parse_args(argv)
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="im3d-eta-user-"))
    import blender_demo
    import bpy
    from im3d.demo import DEMO_OVERRIDES

    out = Path(tempfile.mkdtemp(prefix="im3d-eta-"))
    runtime = blender_demo.install_extension(out / "dist")
    local = sys.modules[f"{blender_demo.PACKAGE}.local_backend"]
    bpy.ops.wm.read_homefile(use_factory_startup=True, use_empty=True)
    prefs = bpy.context.preferences.addons[blender_demo.PACKAGE].preferences
    prefs.python_path, prefs.port = sys.executable, blender_demo._free_port()
    try:
        original = blender_demo._suzanne()
        overrides = json.loads(args.overrides) if args.overrides else json.loads(json.dumps(DEMO_OVERRIDES))
        runs = [run_once(bpy, runtime, original, json.loads(json.dumps(overrides))) for _ in range(2)]
    finally:
        local.stop_backend()
    print("| run | measured speeds | job total | worst ETA error after the first quarter |")
    print("|---|---|---|---|")
    for index, run in enumerate(runs):
        worst = run["worst_error_after_quarter"]
        print(f"| {index + 1} | {'none' if index == 0 else 'from run 1'} | {run['total_s']:.0f} s | {'-' if worst is None else f'{worst:.0%}'} |")
    if args.timeline:
        args.timeline.write_text(json.dumps([{"total_s": r["total_s"], "samples": r["samples"]} for r in runs], indent=0), encoding="utf-8")
        print(f"samples written to {args.timeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
