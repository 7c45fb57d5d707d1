"""The local backend: its Python environment (set up with uv from the bundled lock) and its process.

Standard library only, no bpy, so scripts and tests drive it the same way the preferences do.
The backend binds 127.0.0.1 only; its bearer token lives in a file only this user can read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .client import BackendClient, BackendError

LogFn = Callable[[str], None]
IS_WINDOWS = os.name == "nt"


def env_python(env_dir: str | os.PathLike) -> Path:
    env_dir = Path(env_dir)
    return env_dir / ("Scripts/python.exe" if IS_WINDOWS else "bin/python")


def read_or_create_token(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(token)
    return token


def tail(path: str | os.PathLike, lines: int = 12) -> list[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as file:
            return [line.rstrip("\n") for line in deque(file, maxlen=lines)]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------
# Environment set-up


def find_uv(tools_dir: str | os.PathLike | None = None) -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    if tools_dir is not None:
        for candidate in Path(tools_dir).glob("**/uv.exe" if IS_WINDOWS else "**/bin/uv"):
            if candidate.is_file():
                return str(candidate)
    return None


def setup_environment(
    source_dir: str | os.PathLike,
    env_dir: str | os.PathLike,
    tools_dir: str | os.PathLike,
    log: LogFn,
    cancel: Callable[[], bool] = lambda: False,
    python_version: str = "3.11",
) -> Path:
    """Create the backend's environment exactly from `source_dir/uv.lock`; returns its Python.

    Installs uv into `tools_dir` with Blender's own pip when it is not on PATH. Every output line
    goes to `log`; a failure raises `BackendError("setup_failed", ...)` quoting the last lines.
    """
    source_dir = Path(source_dir)
    for needed in ("pyproject.toml", "uv.lock", "im3d"):
        if not (source_dir / needed).exists():
            raise BackendError("setup_failed", f"the bundled backend is incomplete: {source_dir / needed} is missing; reinstall the extension")
    uv = find_uv(tools_dir)
    if uv is None:
        log(f"uv not found on PATH: installing it into {tools_dir}")
        _run_logged([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(tools_dir), "uv"], log, cancel)
        uv = find_uv(tools_dir)
        if uv is None:
            raise BackendError("setup_failed", "pip installed uv but its executable was not found; install uv yourself (https://docs.astral.sh/uv/)")
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(env_dir))
    command = [uv, "sync", "--project", str(source_dir), "--frozen", "--no-dev", "--python", python_version]
    _run_logged(command, log, cancel, env=env)
    python = env_python(env_dir)
    if not python.exists():
        raise BackendError("setup_failed", f"uv finished but {python} does not exist")
    log(f"backend environment ready: {python}")
    return python


def _run_logged(command: list[str], log: LogFn, cancel: Callable[[], bool], env: dict | None = None) -> None:
    log("$ " + " ".join(command))
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1, errors="replace"
        )
    except OSError as error:
        raise BackendError("setup_failed", f"cannot run {command[0]}: {error.strerror}") from None
    last: deque[str] = deque(maxlen=5)
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        last.append(line)
        log(line)
        if cancel():
            process.terminate()
            process.wait()
            raise BackendError("setup_cancelled", "setting up the backend was cancelled")
    if process.wait() != 0:
        raise BackendError("setup_failed", f"{Path(command[0]).name} {command[1]} failed (exit {process.returncode}): " + " | ".join(last))


# ----------------------------------------------------------------------------------------------
# The process


class BackendProcess:
    """Start, watch and stop `python -m im3d.cli serve` on 127.0.0.1:port."""

    def __init__(
        self,
        python: str | os.PathLike,
        data_dir: str | os.PathLike,
        port: int = 8765,
        device: str = "auto",
        low_vram: bool = False,
        models_dir: str = "",
        extra_assignments: list[str] | None = None,
        extra_env: dict | None = None,
        extra_args: list[str] | None = None,
    ):
        self.python = str(python)
        self.data_dir = Path(data_dir)
        self.port, self.device, self.low_vram, self.models_dir = int(port), device, low_vram, models_dir
        self.extra_assignments = list(extra_assignments or [])
        self.extra_env = dict(extra_env or {})
        self.extra_args = list(extra_args or [])  # e.g. ["--runner", "module:function"] for tests
        self.token_file = self.data_dir / "token"
        self.log_path = self.data_dir / "backend.log"
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        return read_or_create_token(self.token_file)

    def client(self, timeout: float = 10.0) -> BackendClient:
        return BackendClient(self.url, self.token(), timeout)

    def command(self) -> list[str]:
        assignments = [f"pipeline.device={self.device}"]
        if self.low_vram:
            assignments.append("diffusion.cpu_offload=true")
        if self.models_dir:
            assignments.append(f"diffusion.models_dir={json.dumps(self.models_dir)}")
        command = [
            self.python, "-m", "im3d.server", "--port", str(self.port),
            "--token-file", str(self.token_file), "--jobs-dir", str(self.data_dir / "jobs"),
        ]
        for assignment in assignments + self.extra_assignments:
            command += ["--set", assignment]
        return command + self.extra_args

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self._lock:
            if self.running():
                return
            if not Path(self.python).exists():
                raise BackendError("backend_not_set_up", f"the backend's Python {self.python} does not exist; press 'Set up backend' in the add-on's preferences")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.token()
            self._log_file = open(self.log_path, "ab", buffering=0)
            self._log_file.write(f"\n--- starting backend at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if IS_WINDOWS else {"start_new_session": True}
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # not Blender's paths
            env.update(PYTHONUNBUFFERED="1", **self.extra_env)
            try:
                self.process = subprocess.Popen(
                    self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **flags
                )
            except OSError as error:
                self._close_log()
                raise BackendError("backend_start_failed", f"cannot start {self.python}: {error.strerror}") from None

    def wait_ready(self, timeout: float = 60.0, cancel: Callable[[], bool] = lambda: False) -> dict:
        """Block until /v1/health answers; a process that exits first raises with its last log lines."""
        deadline = time.monotonic() + timeout
        client = self.client(timeout=2.0)
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BackendError(
                    "backend_exited", f"the backend exited with code {self.process.returncode}: " + " | ".join(tail(self.log_path, 5))
                )
            try:
                return client.health(timeout=2.0)
            except BackendError as error:
                if error.code not in ("backend_unreachable", "timeout"):
                    raise
            if cancel() or time.monotonic() > deadline:
                raise BackendError("backend_start_timeout", f"the backend did not answer within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            process, self.process = self.process, None
            if process is not None and process.poll() is None:
                try:
                    if IS_WINDOWS:
                        process.send_signal(signal.CTRL_BREAK_EVENT)
                    else:
                        process.terminate()
                    process.wait(timeout)
                except (subprocess.TimeoutExpired, OSError):
                    process.kill()
                    process.wait(5)
            self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def status_text(self) -> str:
        if self.process is None:
            return "stopped"
        code = self.process.poll()
        return f"running (pid {self.process.pid})" if code is None else f"exited with code {code}"

    def last_log_lines(self, lines: int = 12) -> list[str]:
        return tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
