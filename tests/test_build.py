"""build.py: the extension zip's layout, and Blender's validator accepting it (and rejecting a broken one)."""

from __future__ import annotations

import importlib.util
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
