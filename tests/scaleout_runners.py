"""The stand-in job of the scale-out tests and bench, run inside Ray worker actors.

It is `service_runners.staged_job` (six stages with progress, previews and cancel checks, knobs in
the prompt) plus one artifact, `where.json`, saying which process ran it in which folder, and
`input_echo.*`, the bytes of the job's input image as the worker received them. Ray imports this
module by name in the worker processes: the tests put `tests/` on their PYTHONPATH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from service_runners import staged_job


def standin_job(inputs, workdir, config, progress, cancel):
    artifacts = dict(staged_job(inputs, workdir, config, progress, cancel))
    workdir = Path(workdir)
    (workdir / "where.json").write_text(json.dumps({"pid": os.getpid(), "workdir": str(workdir)}))
    artifacts["where.json"] = workdir / "where.json"
    if inputs.image is not None:
        echo = workdir / f"input_echo{Path(inputs.image).suffix}"
        echo.write_bytes(Path(inputs.image).read_bytes())
        artifacts[echo.name] = echo
    return artifacts


def kill_ray_processes_of(temp_dir: str | Path) -> int:
    """SIGKILL every process that has a file open under `temp_dir` (a Ray cluster started with
    `_temp_dir=temp_dir`): ray.shutdown() can leave an agent behind when start-up failed, and Ray
    renames its processes, so their command lines do not say whose they are. Returns the count."""
    import signal

    marker = str(Path(temp_dir).resolve())
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(marker) for link in links):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed
