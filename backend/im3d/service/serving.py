"""Serving the app: the jobs folder, the token file, the listening socket and uvicorn."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from im3d import __version__
from im3d.config import Config, ConfigError
from im3d.service.auth import LOOPBACK_HOSTS, load_or_create_token
from im3d.service.store import JobStore
from im3d.service.worker import RunFn

log = logging.getLogger("im3d.server")

READY_PREFIX = "IM3D-READY"
HEAD_TIMEOUT_S = 10.0  # a connection must deliver its request head within this
IDLE_TIMEOUT_S = 5  # keep-alive connections idle longer are closed
MAX_CONNECTIONS = 64  # open connections + running requests; a local add-on needs a handful
MAX_HEAD_BYTES = 64 * 1024


SHUTDOWN_DEADLINE_S = 8.0


def _force_exit() -> None:
    log.error("the backend did not stop within %.0f s of the signal; exiting now", SHUTDOWN_DEADLINE_S)
    logging.shutdown()
    os._exit(1)


def head_timeout_protocol():
    """uvicorn's h11 protocol, plus a deadline for each request head: uvicorn itself times out only
    idle keep-alive connections, so a client sending its headers byte by byte (or nothing) would
    hold a connection forever. The deadline is armed when the connection opens and after each
    response; if the head has not fully arrived by then (h11 still waits for it), it closes."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self):
            previous = getattr(self, "_head_deadline", None)
            if previous is not None:
                previous.cancel()
            self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_deadline_passed)

        def _head_deadline_passed(self):
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request head within the deadline (idle or trickling bytes)

        def connection_lost(self, exc):
            previous = getattr(self, "_head_deadline", None)
            if previous is not None:
                previous.cancel()
            super().connection_lost(exc)

    return HeadTimeoutProtocol


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
    if not config.server.allow_remote and host.strip("[]").lower() not in LOOPBACK_HOSTS:
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

        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: the graceful path (cancel the job, mark it interrupted) gets
            # SHUTDOWN_DEADLINE_S; past that the process ends anyway, whatever a job is doing. The
            # next start reports that job `interrupted` (crash recovery), so nothing is lost.
            if not getattr(self, "_deadline", None):
                self._deadline = threading.Timer(SHUTDOWN_DEADLINE_S, _force_exit)
                self._deadline.daemon = True
                self._deadline.start()
            super().handle_exit(sig, frame)

    uvicorn_config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", ws="none",
        http=head_timeout_protocol(),  # slow or absent request heads cannot pin connections
        timeout_keep_alive=IDLE_TIMEOUT_S,  # idle keep-alive connections close
        limit_concurrency=MAX_CONNECTIONS,  # past it: 503, the service stays responsive
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # a request head larger than this is refused
        timeout_graceful_shutdown=3,
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

