#!/usr/bin/env python3
"""Developer entry point: the two commands of the README.

    python3 dev.py demo     run the main job (sets everything up first)
    python3 dev.py test     run the test suite (sets everything up first)

Standard library only, so it runs on a fresh machine. Each command bootstraps what it needs and
is safe to re-run: `uv` (installed into ./.tools when it is not on PATH), the backend's locked
environment (`backend/uv.lock`, Python 3.11 with the dev group: pytest and the `bpy` module),
and the npm tools the tests use (`tools/npm/package-lock.json`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BACKEND = ROOT / "backend"
TOOLS = ROOT / ".tools"
NPM_TOOLS = ROOT / "tools" / "npm"
UV_VERSION = "0.13.9"
DEV_PYTHON = "3.11"  # the bpy 5.0 wheel is built for CPython 3.11 only


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def bin_dir(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def ensure_uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    tool_env = TOOLS / "uv-env"
    uv = bin_dir(tool_env) / ("uv.exe" if os.name == "nt" else "uv")
    if not uv.exists():
        log(f"installing uv {UV_VERSION} into {tool_env}")
        venv.create(tool_env, with_pip=True, clear=True)
        run([bin_dir(tool_env) / "python", "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"])
    return str(uv)


def venv_python() -> Path:
    return bin_dir(BACKEND / ".venv") / ("python.exe" if os.name == "nt" else "python")


def ensure_python_env(uv: str) -> Path:
    # --frozen: install exactly the lock; a stale lock is an error, never a silent re-resolve.
    # --compile-bytecode: where Python may not write .pyc files (PYTHONDONTWRITEBYTECODE, a read-only
    # install) every process would compile torch & co. again: 4.5 s more per job start, tests twice as
    # slow where they spawn processes (docs/benchmarks.md, "Start-up").
    run([uv, "sync", "--project", BACKEND, "--group", "dev", "--frozen", "--compile-bytecode", "--python", DEV_PYTHON])
    return venv_python()


def ensure_npm_tools() -> None:
    if not (NPM_TOOLS / "package-lock.json").exists():
        return
    if (NPM_TOOLS / "node_modules" / ".package-lock.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        log("npm not found: tests that need the glTF validator will be skipped")
        return
    run([npm, "ci", "--no-audit", "--no-fund", "--prefix", NPM_TOOLS])


def cmd_test(args: list[str]) -> int:
    python = ensure_python_env(ensure_uv())
    ensure_npm_tools()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([str(python), "-m", "pytest", *args], cwd=ROOT, env=env)
    return result.returncode


def cmd_demo(args: list[str]) -> int:
    python = ensure_python_env(ensure_uv())
    demo = ROOT / "tools" / "main_job.py"
    return subprocess.run([str(python), str(demo), *args], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    commands = {"test": cmd_test, "demo": cmd_demo}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except subprocess.CalledProcessError as error:
        log(f"set-up step failed (exit {error.returncode}): {' '.join(map(str, error.cmd))}")
        return error.returncode or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
