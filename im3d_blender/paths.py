"""Where the add-on keeps its files, and its preferences. bpy only for the extension's user folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import bpy

ADDON_ROOT = Path(__file__).resolve().parent


def package_name() -> str:
    return __package__ or "im3d_blender"


def preferences():
    addon = bpy.context.preferences.addons.get(package_name())
    return addon.preferences if addon is not None else None


def user_dir(*parts: str) -> Path:
    """Writable per-user folder of the extension (survives updates); plain-package fallback for scripts."""
    try:
        base = Path(bpy.utils.extension_path_user(package_name(), path="", create=True))
    except (ValueError, RuntimeError):
        base = Path(bpy.utils.user_resource("DATAFILES", path="im3d", create=True))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_backend_source() -> Path:
    """The backend source shipped inside the extension zip (or the repository's, when run from a checkout)."""
    bundled = ADDON_ROOT / "backend"
    return bundled if (bundled / "pyproject.toml").exists() else ADDON_ROOT.parent / "backend"


def results_dir() -> Path:
    return user_dir("results")


def turntable_folder() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{time.monotonic_ns() % 100000}"
    return user_dir("turntables") / stamp
