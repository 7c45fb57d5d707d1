"""The local backend process: start, recognise, watch and stop `python -m im3d.server` on 127.0.0.1.

Standard library only, no bpy, so scripts and tests drive it the same way the preferences do.
The backend binds 127.0.0.1 only; its bearer token lives in a file only this user can read.
A backend is recognised by its protocol (`/v1/health` answering with `protocol`), never by "some
HTTP answer on the port": another program on the port gets a message that names the port.
(The environment it runs in is made by `setup_env.py`.)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable

from .client import PROTOCOL_VERSION, BackendClient, BackendError
from .setup_env import IS_WINDOWS, environment_ready

# What the backend prints when its port is taken (im3d.server.bind_socket, uvicorn, the OS).
PORT_TAKEN_MARKERS = ("address already in use", "cannot listen on", "only one usage of each socket address")


def probe(url: str, token: str, timeout: float = 1.0) -> str:
    """What answers on `url`: "free" (nothing), "im3d" (our protocol, our token),
    "im3d_other_token" (an IM-3D backend that does not know our token) or "foreign" (another program)."""
    request = urllib.request.Request(url + "/v1/health", headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read(4096)
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read(4096)
    except Exception as error:  # noqa: BLE001 - anything but "refused" means some program holds the port
        reason = getattr(error, "reason", error)
        if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower():
            return "free"
        return "foreign"  # a timeout, a reset, an answer that is not HTTP
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "foreign"
    if status == 200 and isinstance(payload, dict) and payload.get("protocol") == PROTOCOL_VERSION and "version" in payload:
        return "im3d"
    error = payload.get("error") if isinstance(payload, dict) else None
    if status == 401 and isinstance(error, dict) and error.get("code") == "unauthorized":
        return "im3d_other_token"
    return "foreign"


def port_taken_message(port: int, log_line: str = "") -> str:
    text = f"port {port} is used by another program; pick another port in Preferences (IM-3D → Port) and start again"
    return text + (f" (the backend's log: {log_line})" if log_line else "")


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
        env_dir: str | os.PathLike | None = None,
    ):
        self.python = str(python)
        self.env_dir = Path(env_dir) if env_dir else None  # set when the environment is the set-up one
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
        self.ready = False  # /v1/health answered with our protocol since the last start
        self.adopted = False  # an IM-3D backend of ours was already serving the port (e.g. from a crashed Blender)
        self.last_error = ""

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
            if not Path(self.python).exists() or (self.env_dir is not None and not environment_ready(self.env_dir)):
                raise BackendError(
                    "backend_not_set_up", "the backend is not set up yet: press Set up Backend in the add-on's preferences (Edit → Preferences → Add-ons → IM-3D)"
                )
            self.ready, self.adopted, self.last_error = False, False, ""
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
        """Block until /v1/health answers with our protocol; a process that exits first raises with its last log lines."""
        deadline = time.monotonic() + timeout
        client = self.client(timeout=2.0)
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise self._fail(self._exit_error())
            try:
                health = client.health(timeout=2.0)
                self.ready = True
                return health
            except BackendError as error:
                if error.code not in ("backend_unreachable", "timeout"):
                    # Something answered that is not our backend (or not with our token): name the port.
                    kind = probe(self.url, self.token())
                    if kind == "foreign":
                        raise self._fail(BackendError("port_in_use", port_taken_message(self.port, self._last_line())))
                    raise self._fail(error)
            if cancel():
                raise BackendError("cancelled", "starting the backend was cancelled")
            if time.monotonic() > deadline:
                raise self._fail(BackendError("backend_start_timeout", f"the backend did not answer within {timeout:.0f} s; its log: {self._last_line() or self.log_path}"))
            time.sleep(0.2)

    def ensure_ready(self, timeout: float = 90.0, cancel: Callable[[], bool] = lambda: False, start: bool = True) -> dict:
        """Make sure an IM-3D backend of ours answers on the port: adopt one already there, else start
        ours (when `start`) and wait for it. Meant for a worker thread: it blocks as long as the start takes."""
        if self.running():
            return self.wait_ready(timeout, cancel)
        kind = probe(self.url, self.token())
        if kind == "im3d":
            self.ready, self.adopted = True, True
            return self.client().health()
        if kind == "im3d_other_token":
            raise self._fail(BackendError(
                "port_in_use", f"another IM-3D backend (not started by this Blender user folder) is using port {self.port}; "
                "stop it, or pick another port in Preferences (IM-3D → Port)",
            ))
        if kind == "foreign":
            raise self._fail(BackendError("port_in_use", port_taken_message(self.port)))
        if not start:
            raise BackendError("backend_not_running", "the backend is not running: press Start in the add-on's preferences, or switch Start Automatically on")
        self.start()
        return self.wait_ready(timeout, cancel)

    def _exit_error(self) -> BackendError:
        code = self.process.returncode if self.process is not None else None
        lines = tail(self.log_path, 40)
        since_start = lines[max((i for i, l in enumerate(lines) if l.startswith("--- starting backend")), default=-1) + 1:]
        if any(marker in line.lower() for line in since_start for marker in PORT_TAKEN_MARKERS):
            return BackendError("port_in_use", port_taken_message(self.port, self._last_line()))
        if any("No module named 'im3d'" in line for line in since_start):
            return BackendError("backend_not_set_up", f"{self.python} has no im3d package: press Set up Backend in the add-on's preferences")
        return BackendError("backend_exited", f"the backend exited with code {code}: " + " | ".join(since_start[-3:]))

    def _last_line(self) -> str:
        lines = [line for line in tail(self.log_path, 20) if line.strip() and not line.startswith("--- starting backend")]
        return lines[-1].strip()[:300] if lines else ""

    def _fail(self, error: BackendError) -> BackendError:
        self.ready, self.last_error = False, error.message
        return error

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            process, self.process = self.process, None
            self.ready = self.adopted = False
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
        """What the preferences show; "running" only for a live process that answered (never for an exited one)."""
        if self.process is None:
            if self.adopted and self.ready:
                return f"running (an IM-3D backend already on port {self.port})"
            return f"stopped: {self.last_error}" if self.last_error else "stopped"
        code = self.process.poll()
        if code is not None:
            return f"exited with code {code}: {self.last_error or self._last_line()}"
        return f"running (pid {self.process.pid}, port {self.port})" if self.ready else "starting…"

    def last_log_lines(self, lines: int = 12) -> list[str]:
        return tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
