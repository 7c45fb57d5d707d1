"""One background model pull per backend process, with progress, cancel and a status to poll.

The service's `POST /v1/models/pull` starts it; the access token lives only in the worker
thread's arguments: it is never part of the status, never logged and never written to disk.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

from im3d.errors import Cancelled, as_im3d_error

log = logging.getLogger("im3d.models")


class PullTask:
    """A pull running on its own thread; `status()` is what `GET /v1/models/pull` returns."""

    def __init__(self, config: Any, names: list[str] | None, token: str | None,
                 pull_fn: Callable[..., Any] | None = None):
        from im3d.weights.pull import pull_models

        self.id = uuid.uuid4().hex[:12]
        self.names = list(names or [])
        self._config = config
        self._token = token
        self._pull_fn = pull_fn or pull_models
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._state = {"id": self.id, "state": "running", "progress": 0.0, "message": "starting",
                       "names": self.names, "error": None, "models": [], "started": time.time(), "finished": None}
        self._thread = threading.Thread(target=self._run, name=f"im3d-pull-{self.id}", daemon=True)

    def start(self) -> "PullTask":
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._state["progress"] = round(float(fraction), 4)
            self._state["message"] = message

    def _run(self) -> None:
        token, self._token = self._token, None  # held by this frame only
        try:
            statuses = self._pull_fn(self._config, self.names or None, token=token, progress=self._progress, cancel=self._cancel.is_set)
            self._finish("succeeded", models=[st.to_dict() for st in statuses], message="all models present", progress=1.0)
        except Cancelled:
            self._finish("cancelled", message="cancelled; pull again to continue")
        except Exception as error:  # noqa: BLE001 - reported to the client as {code, message}
            known = as_im3d_error(error)
            if known is None:
                log.exception("model pull %s failed", self.id)
                code, message = "internal_error", f"{type(error).__name__}: {error}"
            else:
                code, message = known.code, known.message
            if token:
                message = message.replace(token, "***")
            self._finish("failed", error={"code": code, "message": message}, message=message)
        finally:
            del token

    def _finish(self, state: str, **fields: Any) -> None:
        with self._lock:
            self._state.update(fields, state=state, finished=time.time())
        log.info("model pull %s %s", self.id, state)

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)


class PullTasks:
    """At most one pull at a time; a second request while one runs gets the running one."""

    def __init__(self, pull_fn: Callable[..., Any] | None = None):
        self._lock = threading.Lock()
        self.current: PullTask | None = None
        self._pull_fn = pull_fn

    def start(self, config: Any, names: list[str] | None, token: str | None) -> PullTask:
        with self._lock:
            if self.current is not None and self.current.running:
                return self.current
            self.current = PullTask(config, names, token, self._pull_fn).start()
            return self.current

    def cancel(self) -> PullTask | None:
        with self._lock:
            task = self.current
        if task is not None:
            task.cancel()
        return task

    def shutdown(self, timeout: float = 10.0) -> None:
        task = self.cancel()
        if task is not None:
            task.wait(timeout)
