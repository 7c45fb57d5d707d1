"""Small real run functions for the service tests (in-process and `python -m im3d.server --runner`).

They follow the `im3d.pipeline.run_job` contract: numbered stages with `progress()` calls, a
`cancel()` check between steps, real files written into the job folder (partial files first,
artifacts at the end), preview PNGs in `previews/`. The prompt carries test knobs as
`key=value` words: `steps=N` per stage, `step_s=S` sleep per step, `hold=STAGE` (only that stage
takes `steps`, the others one quick step), `fail=storage|pipeline|crash`, `artifact_kb=K` size of
the mesh artifact.
"""

from __future__ import annotations

import errno
import json
import struct
import time
import zlib
from pathlib import Path

from im3d.errors import Cancelled, PipelineError

STAGES = ("load_models", "reference_image", "orbit_video", "fit", "mesh", "export")


def knobs(request) -> dict[str, str]:
    return dict(word.split("=", 1) for word in request.prompt.split() if "=" in word)


def tiny_png(value: int) -> bytes:
    """A valid 2x2 grey PNG (no Pillow needed)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([value % 256] * 2) for _ in range(2))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def staged_job(request, workdir: Path, config, progress, cancel, stage_entered=None):
    """Six stages x `steps` steps; `stage_entered(stage)` (in-process tests) is called as each begins."""
    opts = knobs(request)
    steps = int(opts.get("steps", 3))
    step_s = float(opts.get("step_s", 0.005))
    workdir = Path(workdir)
    (workdir / "previews").mkdir(exist_ok=True)
    hold = opts.get("hold")
    stage_steps = {s: (steps if hold in (None, s) else 1) for s in STAGES}
    total = sum(stage_steps.values())
    done = 0
    for stage in STAGES:
        steps = stage_steps[stage]
        progress(stage, done / total, f"{stage}: starting", None)
        if stage_entered is not None:
            stage_entered(stage)
        # A partial file appears in every stage; it must never reach a manifest unless the job succeeds.
        with open(workdir / f"partial_{stage}.bin", "wb") as handle:
            for step in range(steps):
                if cancel():
                    raise Cancelled()
                handle.write(b"x" * 1024)
                handle.flush()
                time.sleep(step_s if hold in (None, stage) else 0.0)
                done += 1
                preview = None
                if stage == "fit":
                    preview = workdir / "previews" / f"fit_{step:04d}.png"
                    preview.write_bytes(tiny_png(step))
                progress(stage, done / total, f"{stage}: step {step + 1}/{steps}", preview)
        if stage == "orbit_video" and opts.get("fail") == "pipeline":
            raise PipelineError("no_object_found", "the orbit video shows no object; try another prompt")
        if stage == "fit" and opts.get("fail") == "crash":
            raise ZeroDivisionError("simulated bug")
        if stage == "mesh" and opts.get("fail") == "storage":
            raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "mesh.glb"))
    if cancel():
        raise Cancelled()
    size = int(float(opts.get("artifact_kb", 4)) * 1024)
    (workdir / "mesh.glb").write_bytes(b"glTF" + bytes(range(256)) * (size // 256 + 1))
    (workdir / "preview.png").write_bytes(tiny_png(200))
    (workdir / "metrics.json").write_text(json.dumps({"seed": config.pipeline.seed, "kind": request.kind}))
    return {"mesh.glb": workdir / "mesh.glb", "preview.png": workdir / "preview.png", "metrics.json": workdir / "metrics.json"}


def stubborn_job(request, workdir: Path, config, progress, cancel):
    """Never looks at cancel(): stands in for a stage stuck in a long native call."""
    progress("fit", 0.1, "stuck")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {}
