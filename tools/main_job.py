"""The README's main job: IM-3D for Blender as an artist meets it, on a fresh machine with no weights.

Real Blender (the `bpy` module) with the built extension installed and enabled; the add-on starts
its local backend, **Refine Selected** runs on the shipped Suzanne with diffusion off (turntable
render in Blender → upload → reconstruction, meshing, texturing in the backend → verified import),
and a saved `.blend` and a rendered before/after image are left in `out/main_job/`.

    python3 dev.py demo            (sets everything up, then runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def main(argv: list[str] | None = None) -> int:
    from im3d.demo import DEMO_OVERRIDES

    import blender_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "main_job")
    parser.add_argument("--preset", default="FAST", choices=["FAST", "STANDARD", "HIGH"])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = blender_demo.run_refine_demo(args.out, args.preset, json.loads(json.dumps(DEMO_OVERRIDES)))
    print(f"\nIM-3D main job done in {time.perf_counter() - started:.0f} s (Refine Selected: {info['refine_seconds']:.0f} s).")
    print(f"  scene (.blend)      {info['blend']}")
    print(f"  before | after      {info['before_after']}")
    print(f"  refined mesh        {info['faces']} faces, backend job {info['job_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
