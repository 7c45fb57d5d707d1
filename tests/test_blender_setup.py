"""Set up Backend (im3d_blender/setup_env.py) on the built zip's backend: the whole set-up offline from
uv's cache (slow), and each failure with its next step — incomplete zip, unusable folder, no uv and no
pip, no network, cancel — leaving no half-made environment. bpy-free: the preferences run the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from test_build import ROOT, build, extract_backend, uv_executable

sys.path.insert(0, str(ROOT))
from im3d_blender.client import BackendError  # noqa: E402
from im3d_blender.setup_env import (  # noqa: E402
    MARKER,
    download_size,
    environment_ready,
    env_python,
    marker_matches,
    setup_environment,
)


@pytest.fixture(scope="module")
def zip_backend(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zip")
    return extract_backend(build.build_zip(folder / "dist"), folder)


@pytest.fixture
def uv_on_path(monkeypatch):
    monkeypatch.setenv("PATH", str(Path(uv_executable()).parent) + os.pathsep + os.environ.get("PATH", ""))


def test_download_size_is_read_from_the_lock_for_this_platform(zip_backend):
    size, packages = download_size(zip_backend / "uv.lock")
    assert packages > 20  # torch, diffusers, ... and their dependencies, not the dev tools
    assert size > 200e6  # torch alone is hundreds of MB on every platform
    linux = download_size(zip_backend / "uv.lock", python=(3, 11, 7))
    assert linux == (size, packages)  # the environment is made with 3.11 whatever runs the estimate


def test_lock_markers_are_evaluated_like_pep_508():
    env = {"python_full_version": "3.11.7", "python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    assert marker_matches("python_full_version >= '3.11'", env)
    assert not marker_matches("python_full_version < '3.11'", env)  # a string compare would say '3.11.7' < '3.9'
    assert marker_matches("python_full_version == '3.11.*'", env)
    assert marker_matches("platform_machine == 'x86_64' and sys_platform == 'linux'", env)
    assert not marker_matches("sys_platform == 'win32' or (sys_platform == 'darwin' and platform_machine == 'arm64')", env)


@pytest.mark.slow  # builds a complete backend environment (hard links from uv's cache; ~25 s on 2 busy cores, and ~30 s compiling bytecode)
def test_setup_from_the_zip_makes_an_environment_that_imports_im3d_and_sees_a_device(zip_backend, tmp_path, uv_on_path):
    lines, steps = [], []
    python = setup_environment(
        zip_backend, tmp_path / "env", tmp_path / "tools", lines.append, progress=lambda f, t: steps.append((f, t)),
        extra_env={"UV_OFFLINE": "1"},  # everything from the cache dev.py's sync filled: proves the lock and the zip agree
    )
    assert python == env_python(tmp_path / "env") and environment_ready(tmp_path / "env")
    assert "GB to download" in lines[0]  # the size is told before anything is fetched
    assert steps[-1][0] == 1.0 and "torch" in steps[-1][1] and [f for f, _ in steps] == sorted(f for f, _ in steps)
    # Compiled at set-up, so that no backend start compiles torch again where .pyc files cannot be written.
    assert any("bytecode" in text for _, text in steps)
    env = tmp_path / "env"
    assert [*env.glob("lib/python3*/site-packages/torch/__pycache__/__init__.*.pyc"), *env.glob("Lib/site-packages/torch/__pycache__/__init__.*.pyc")]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # cwd: `python -c` puts it on sys.path, and a checkout's backend/ there would shadow the zip's.
    result = subprocess.run([str(python), "-c", "import im3d.server, torch; print(im3d.server.__file__)"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(zip_backend)  # the zip's source, not the checkout's


def test_no_network_says_so_and_removes_the_unfinished_environment(zip_backend, tmp_path, uv_on_path):
    lines = []
    with pytest.raises(BackendError) as caught:
        setup_environment(
            zip_backend, tmp_path / "env", tmp_path / "tools", lines.append,
            extra_env={"UV_OFFLINE": "1", "UV_CACHE_DIR": str(tmp_path / "empty-cache")},  # offline with nothing cached
        )
    assert caught.value.code == "setup_no_network", caught.value.message
    assert "connect to the internet" in caught.value.message and "Set up Backend again" in caught.value.message
    assert not (tmp_path / "env").exists()


def test_cancel_stops_uv_and_removes_the_environment(zip_backend, tmp_path, uv_on_path):
    with pytest.raises(BackendError) as caught:
        setup_environment(zip_backend, tmp_path / "env", tmp_path / "tools", lambda line: None, cancel=lambda: True, extra_env={"UV_OFFLINE": "1"})
    assert caught.value.code == "setup_cancelled"
    assert not (tmp_path / "env").exists()


def test_no_uv_and_no_pip_says_how_to_get_uv(zip_backend, tmp_path, monkeypatch):
    no_pip = tmp_path / "no-pip"
    venv.create(no_pip, with_pip=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(BackendError) as caught:
        setup_environment(zip_backend, tmp_path / "env", tmp_path / "tools", lambda line: None, pip_python=str(env_python(no_pip)))
    assert caught.value.code == "setup_no_uv"
    assert "install uv (https://docs.astral.sh/uv/)" in caught.value.message
    assert not (tmp_path / "env").exists()


def test_a_folder_that_cannot_hold_the_environment_is_refused_before_anything_changes(zip_backend, tmp_path):
    busy = tmp_path / "my documents"
    busy.mkdir()
    (busy / "thesis.txt").write_text("precious")
    with pytest.raises(BackendError, match="not empty and is not a Python environment; choose an empty or new Environment folder"):
        setup_environment(zip_backend, busy, tmp_path / "tools", lambda line: None)
    assert (busy / "thesis.txt").read_text() == "precious"  # never removed: it was not ours
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BackendError, match="is a file, not a folder"):
        setup_environment(zip_backend, a_file, tmp_path / "tools", lambda line: None)
    if sys.platform.startswith("linux"):  # even root cannot create files in /proc
        with pytest.raises(BackendError, match="cannot write to /proc.*choose an Environment folder you can write to"):
            setup_environment(zip_backend, Path("/proc/im3d-env"), tmp_path / "tools", lambda line: None)


def test_a_half_made_environment_is_not_ready(tmp_path):
    python = env_python(tmp_path)
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert not environment_ready(tmp_path)  # the start says "press Set up Backend", not "No module named 'im3d'"
    (tmp_path / MARKER).write_text("{}")
    assert environment_ready(tmp_path)
