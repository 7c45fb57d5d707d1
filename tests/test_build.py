"""build.py: the extension zip's layout, and Blender's validator accepting it (and rejecting a broken one)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("im3d_build", ROOT / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    return build.build_zip(tmp_path_factory.mktemp("dist"))


def test_zip_layout(built_zip):
    with zipfile.ZipFile(built_zip) as archive:
        names = set(archive.namelist())
        manifest = archive.read("blender_manifest.toml").decode()
    assert {"blender_manifest.toml", "__init__.py", "client.py", "turntable.py"} <= names  # manifest beside __init__.py
    assert {"backend/pyproject.toml", "backend/uv.lock", "backend/im3d/__init__.py", "backend/im3d/config.py"} <= names
    # Every file the backend's pyproject names (hatchling refuses to build the wheel without its readme).
    assert "backend/README.md" in names and {f"backend/{n}" for n in build.backend_files()} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") or ".venv" in n for n in names)
    assert 'network = "' in manifest and built_zip.name == f"im3d_blender-{build.manifest_version()}.zip"
    # The add-on itself never imports the heavy backend libraries.
    with zipfile.ZipFile(built_zip) as archive:
        for name in names:
            if name.endswith(".py") and not name.startswith("backend/"):
                source = archive.read(name).decode()
                assert "import torch" not in source and "import numpy" not in source, name


def test_blender_validator_accepts_the_zip(built_zip):
    if build.validator_script() is None:
        pytest.skip("the bpy module is not installed: no Blender validator")
    assert "Success" in build.validate(built_zip)


def test_blender_validator_rejects_a_bad_manifest(built_zip, tmp_path):
    if build.validator_script() is None:
        pytest.skip("the bpy module is not installed: no Blender validator")
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(built_zip) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "blender_manifest.toml":
                data = data.replace(b'blender_version_min = "4.2.0"', b'blender_version_min = "four"')
            target.writestr(item, data)
    with pytest.raises(build.BuildError, match="does not validate"):
        build.validate(broken)


def test_cli_builds_into_the_given_folder(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(tmp_path), "--no-validate"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"im3d_blender-{build.manifest_version()}.zip").is_file()


def uv_executable() -> str:
    """The uv that dev.py uses (on PATH, or installed by dev.py into .tools/)."""
    found = shutil.which("uv") or str(ROOT / ".tools" / "uv-env" / ("Scripts/uv.exe" if os.name == "nt" else "bin/uv"))
    assert Path(found).exists(), "uv is missing: run `python3 dev.py test`, which installs it"
    return found


def extract_backend(zip_path: Path, target: Path) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            if name.startswith("backend/"):
                archive.extract(name, target)
    return target / "backend"


def test_the_zips_backend_builds_a_wheel_that_imports_in_a_fresh_environment(built_zip, tmp_path):
    """What Set up Backend does first (uv builds `im3d` from the zip's files), without the 3 GB of dependencies."""
    uv = uv_executable()
    source = extract_backend(built_zip, tmp_path)
    env = dict(os.environ, UV_OFFLINE="1")  # hatchling comes from uv's cache, filled by dev.py's sync
    result = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("im3d-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    packaged = {n for n in names if n.startswith("im3d/") and n.endswith(".py")}
    shipped = {n[len("backend/"):] for n in zipfile.ZipFile(built_zip).namelist() if n.startswith("backend/im3d/") and n.endswith(".py")}
    assert packaged == shipped and "im3d/server.py" in packaged
    assert "Requires-Dist: torch" in metadata and "im3d = im3d.cli:main" in entry_points
    fresh = tmp_path / "env"
    subprocess.run([uv, "venv", "-q", str(fresh), "--python", sys.executable], check=True, env=env)
    python = fresh / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([uv, "pip", "install", "-q", "--no-deps", "--python", str(python), str(wheel)], check=True, env=env)
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(python), "-c", "import im3d; print(im3d.__file__); print(im3d.__version__)"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    location, version = result.stdout.split()
    import tomllib

    assert Path(location).is_relative_to(fresh)
    assert version == tomllib.loads((source / "pyproject.toml").read_text())["project"]["version"]


def test_a_zip_without_the_readme_is_refused_by_set_up(built_zip, tmp_path):
    """The set-up checks the bundled source before it changes anything (the bug: a hatchling traceback after 15 s)."""
    sys.path.insert(0, str(ROOT))
    from im3d_blender.setup_env import setup_environment
    from im3d_blender.client import BackendError

    source = extract_backend(built_zip, tmp_path)
    (source / "README.md").unlink()
    with pytest.raises(BackendError, match="README.md is missing; reinstall the extension"):
        setup_environment(source, tmp_path / "env", tmp_path / "tools", lambda line: None)
    assert not (tmp_path / "env").exists()
