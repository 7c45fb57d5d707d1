"""Serving the app: the jobs folder, the token file, the listening socket and uvicorn."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from im3d import __version__
from im3d.config import Config, ConfigError
from im3d.service.auth import host_is_loopback, load_or_create_token
from im3d.service.store import JobStore
from im3d.service.worker import RunFn

log = logging.getLogger("im3d.server")

READY_PREFIX = "IM3D-READY"


def user_data_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "im3d"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "im3d"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "im3d"


def resolve_jobs_dir(config: Config) -> Path:
    return Path(config.server.jobs_dir).expanduser() if config.server.jobs_dir else user_data_dir() / "jobs"


def resolve_token_file(config: Config) -> Path:
    if config.server.token_file:
        return Path(config.server.token_file).expanduser()
    return resolve_jobs_dir(config).absolute().parent / "token"



def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name == "posix":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({error.strerror}); another backend may be running, or choose another server.port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: Config, ready: Callable[[str], None] | None = None, run_fn: RunFn | None = None) -> None:
    """Run the API until SIGINT/SIGTERM; `ready(url)` is called once it accepts connections.

    On shutdown the running job is cancelled and marked `interrupted`, queued ones too.
    """
    import uvicorn

    host = config.server.host
    if not config.server.allow_remote and not host_is_loopback(host):
        raise ConfigError(f"server.host {host!r} is not a loopback address; set server.allow_remote = true to listen on it")
    jobs_dir = resolve_jobs_dir(config)
    JobStore(jobs_dir).prepare()  # a clear storage_error now rather than a failed lifespan later
    token = load_or_create_token(resolve_token_file(config))
    from im3d.service.app import create_app

    app = create_app(config, token, run_fn=run_fn, jobs_dir=jobs_dir)
    sock = bind_socket(host, config.server.port)
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                log.info("IM-3D backend %s listening on %s (jobs in %s)", __version__, url, jobs_dir)
                if ready is not None:
                    ready(url)

    uvicorn_config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=30
    )
    try:
        Server(uvicorn_config).run(sockets=[sock])
    finally:
        sock.close()


def print_ready(url: str) -> None:
    print(f"{READY_PREFIX} {url}", flush=True)


def load_run_fn(spec: str) -> RunFn:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--runner {spec!r} must look like module:function")
    return getattr(importlib.import_module(module_name), attr)

