"""A pipeline stand-in for the backend's `--runner` option: reports progress until cancelled.

Used by tests/test_blender_backend.py so that Cancel and a killed backend are tested against the
real server process at a known moment, however fast the real pipeline is.
"""

import time

from im3d.errors import Cancelled


def run(request, workdir, config, progress, cancel):
    for step in range(600):
        if cancel():
            raise Cancelled()
        progress("fit", step / 600, f"step {step}", None)
        time.sleep(0.1)
    raise RuntimeError("the slow runner was never cancelled")
