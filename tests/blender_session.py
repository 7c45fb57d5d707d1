"""The real `bpy` module for the add-on tests, with a throw-away Blender user directory.

Blender reads `BLENDER_USER_RESOURCES` when it starts, so this must run before anything imports
`bpy`; every add-on test module calls `import_bpy()` at import time. The directory is removed
when the test process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_bpy():
    bpy = sys.modules.get("bpy")
    if bpy is not None:
        return bpy
    if "BLENDER_USER_RESOURCES" not in os.environ:
        user_dir = tempfile.mkdtemp(prefix="im3d-blender-user-")
        os.environ["BLENDER_USER_RESOURCES"] = user_dir
        atexit.register(shutil.rmtree, user_dir, True)
    bpy = pytest.importorskip("bpy", reason="the bpy module (Blender as a Python module) is not installed")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # im3d_blender, importable as a plain package by scripts and tests
    return bpy
