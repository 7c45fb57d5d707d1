"""`server.executor = "ray"`: the same v1 API, jobs run by a pool of worker actors on a Ray cluster.

The API node keeps everything the local executor keeps (job folders, job.json, manifests, crash
recovery: `worker.JobManager`) and changes only who runs a job and in which order:

- `FairQueue` replaces the FIFO: round-robin across artists, at most `server.max_queue_per_artist`
  waiting per artist.
- One dispatch thread per worker actor (`ray_worker.JobWorker`). Each actor reserves
  `server.ray_num_gpus` GPUs (and one unit of `server.ray_resource` when set), so Ray places it on a
  node with a free GPU, and it lives on between jobs with its models warm.
- No shared filesystem: a job's input files go to the worker as bytes through the object store, its
  artifacts come back as bytes, are checked against the worker's sha256 and written atomically into
  the job folder; the manifest is then written by the same code as for local jobs.
- A worker process that dies mid-job (Ray reports `RayActorError`) is restarted by Ray
  (`max_restarts`); the job is retried once on another worker when one is free, then fails with
  `worker_lost`. A failed attempt writes nothing into the job folder, so nothing of it can reach
  a manifest.
- Cancel is sent to the worker actor at once (a threaded actor answers while the job runs); the
  dispatch thread also re-sends it on its next poll (every POLL_S).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from im3d.config import Config
from im3d.errors import Cancelled, Im3dError
from im3d.io_utils import atomic_write_bytes
from im3d.service.fair_queue import FairQueue, queued_eta
from im3d.service.ray_worker import JobWorker, read_tree, safe_relative
from im3d.service.store import FILE_NAME_RE, Job, JobStore
from im3d.service.worker import JobManager, RunFn

log = logging.getLogger("im3d.jobs")

POLL_S = 0.1  # how often a dispatch thread picks up progress (and re-sends a pending cancel)
POLL_TIMEOUT_S = 10.0  # a poll slower than this is skipped, not waited for
ATTEMPTS = 2  # a job is tried at most this often when its worker process dies
RESTART_WORKERS = -1  # Ray restarts a dead worker process without limit: the pool keeps its size


def _ray():
    try:
        import ray
    except ImportError:
        raise Im3dError(
            "ray_unavailable",
            "server.executor is 'ray' but Ray is not installed in the backend's environment; install the extra (pip install 'im3d[ray]') or use server.executor = 'local'",
        ) from None
    return ray


class WorkerLost(Exception):
    """The worker process running an attempt died (killed, out of host memory, node lost)."""


class Worker:
    """One actor of the pool, with what the API node last learnt about it."""

    def __init__(self, name: str, actor: Any):
        self.name = name
        self.actor = actor
        self.busy = False
        self.info: dict[str, Any] = {"name": name, "alive": False}


class WorkerPool:
    """The worker actors and the leases on them (a dispatch thread holds one while it runs a job)."""

    def __init__(self, server_config, run_fn: RunFn | None, device: str):
        ray = _ray()
        self.ray = ray
        self.owns_ray = False
        if not ray.is_initialized():
            # An existing cluster (server.ray_address) or, when empty, a local one started here.
            # Ray reports usage to its makers unless told not to; a studio backend says nothing unasked.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                if server_config.ray_address:
                    ray.init(address=server_config.ray_address, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, log_to_driver=False)
            except Exception as error:  # noqa: BLE001 - Ray raises many kinds at connect; say what to check
                raise Im3dError(
                    "ray_unavailable",
                    f"could not join the Ray cluster {server_config.ray_address or '(local)'}: {error}; start the head node first (docs/scale-out.md) or fix server.ray_address",
                ) from None
            self.owns_ray = True
        options: dict[str, Any] = {
            "num_cpus": 0,  # a worker waits on its GPU; its CPU threads are the pipeline's business
            "num_gpus": server_config.ray_num_gpus,
            "max_restarts": RESTART_WORKERS,
            "max_task_retries": 0,  # a job is not re-run blindly by Ray: the API node decides (ATTEMPTS)
            "max_concurrency": 4,  # run + poll + cancel + describe at once
        }
        if server_config.ray_resource:
            options["resources"] = {server_config.ray_resource: 1}
        actor_class = ray.remote(JobWorker)
        self.lock = threading.Condition()
        self._described_at = float("-inf")
        self.workers = [
            Worker(f"worker-{i + 1}", actor_class.options(**options).remote(f"worker-{i + 1}", run_fn, device))
            for i in range(server_config.ray_workers)
        ]

    def wait_ready(self, timeout: float) -> None:
        """Wait until every actor is placed and started (a GPU free for each); warn for the rest."""
        refs = {w.actor.describe.remote(): w for w in self.workers}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            self._note(refs[ref], ref)
        missing = [w.name for w in self.workers if not w.info.get("alive")]
        if missing:
            log.warning(
                "worker(s) %s not started after %.0f s: the cluster may lack a free GPU (server.ray_num_gpus) or resource; jobs wait for them",
                ", ".join(missing), timeout,
            )

    def _note(self, worker: Worker, ref: Any) -> None:
        try:
            worker.info = {**self.ray.get(ref, timeout=0), "alive": True}
        except Exception:  # noqa: BLE001 - a dead or restarting actor
            worker.info = {**worker.info, "alive": False}

    def acquire(self, avoid: set[str] = frozenset()) -> Worker:
        """A free worker, preferring one not in `avoid` (a retry goes to another worker when one is
        free; with none free, the restarted process of the same worker serves)."""
        with self.lock:
            while True:
                free = [w for w in self.workers if not w.busy]
                if free:
                    chosen = next((w for w in free if w.name not in avoid), free[0])
                    chosen.busy = True
                    return chosen
                self.lock.wait()

    def release(self, worker: Worker) -> None:
        with self.lock:
            worker.busy = False
            self.lock.notify_all()

    def describe(self, timeout: float = 0.5, max_age_s: float = 0.5) -> list[dict[str, Any]]:
        """Every worker's own account (device, GPUs, warm models); at most one round trip per
        `max_age_s`, since one health answer asks for it several times."""
        with self.lock:
            if time.monotonic() - self._described_at < max_age_s:
                return [dict(w.info) for w in self.workers]
        refs = {w.actor.describe.remote(): w for w in self.workers}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        answered = set(ready)
        for ref, worker in refs.items():
            if ref in answered:
                self._note(worker, ref)
            else:
                worker.info = {**worker.info, "alive": False}  # busy restarting, or its node is gone
        with self.lock:
            self._described_at = time.monotonic()
        return [dict(w.info) for w in self.workers]

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.owns_ray:
            self.ray.shutdown()


class RayJobManager(JobManager):
    """`JobManager` whose jobs run on `WorkerPool` actors, dispatched fairly across artists."""

    executor_name = "ray"

    def __init__(self, store: JobStore, run_fn: RunFn | None = None, config: Config | None = None, ready_timeout_s: float = 60.0):
        super().__init__(store, run_fn=run_fn, config=config)
        # The models live on the GPU nodes, not here: each worker checks its own at the job's start.
        self.check_models = None
        self.worker_run_fn = run_fn  # None: the real pipeline, imported in the worker process
        self.ready_timeout_s = ready_timeout_s
        self._queue = FairQueue()  # type: ignore[assignment]
        self._artist: dict[str, str] = {}
        self._placement: dict[str, dict[str, Any]] = {}  # job id -> {worker, attempt}
        self._leases: dict[str, Worker] = {}  # running job id -> its worker
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._local = threading.local()
        self.pool: WorkerPool | None = None
        self.run_fn = self._run_remote  # what JobManager._run calls, once per job

    # -- lifecycle
    def start(self) -> list[str]:
        self.pool = WorkerPool(self.config.server, self.worker_run_fn, self.config.pipeline.device)
        self.pool.wait_ready(self.ready_timeout_s)
        log.info("ray executor: %d worker(s): %s", len(self.pool.workers), ", ".join(
            f"{w.name}@{w.info.get('node', '?')} ({w.info.get('device', '?')})" for w in self.pool.workers))
        return super().start()  # crash recovery as for local jobs, then _work below

    def _work(self) -> None:
        threads = [threading.Thread(target=self._dispatch, name=f"im3d-dispatch-{i + 1}", daemon=True) for i in range(len(self.pool.workers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; queued and running jobs end `interrupted`; the actors are killed."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True  # first: a running job stopped from here on ends interrupted, not cancelled
            for job_id in list(self._queue):
                self._finish(self._jobs[job_id], "interrupted", message="the backend was shut down before this job started; run it again")
            self._queue.clear()
            for job_id, worker in self._leases.items():
                self._jobs[job_id].cancel_event.set()
                worker.actor.cancel.remote(job_id)
            self._wakeup.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        with self._lock:
            for job_id in list(self._leases):
                job = self._jobs[job_id]
                if job.state == "running":
                    log.warning("job %s did not stop within %.0f s; marking it interrupted", job.id, timeout)
                    self._finish(job, "interrupted", message="the backend was shut down while this job was running; run it again")
            self._closed = True
        if self.pool is not None:
            self.pool.close()

    # -- queue
    def _admit(self, artist: str) -> None:
        cap = self.config.server.max_queue_per_artist
        if self._queue.count(artist) >= cap:
            who = artist or "this client"
            raise Im3dError("queue_full", f"{who} already has {cap} jobs waiting (server.max_queue_per_artist); wait for one to start or cancel one")

    def _enqueue(self, job_id: str, artist: str) -> None:
        self._artist[job_id] = artist
        self._queue.append(job_id, artist)

    def _mark_running(self, job: Job) -> None:
        """Jobs run side by side on the workers: there is no single running job to record."""

    def _dispatch(self) -> None:
        while (job := self._take_next()) is not None:
            self._run_guarded(job, "job dispatcher")  # JobManager._run: inputs, run_fn (= _run_remote), manifest, state
            if job.state == "succeeded" and job.started and job.finished:
                self._durations.append(job.finished - job.started)

    # -- one job on the cluster
    def _run_remote(self, inputs, workdir: Path, config: Config, progress, cancel) -> Mapping[str, Path]:
        """The `run_fn` JobManager._run calls: ship inputs, run on a worker, bring artifacts home."""
        ray = self.pool.ray
        workdir = Path(workdir)
        job_id = workdir.name
        artist = self._artist.get(job_id, "")
        files = read_tree(workdir / "inputs") if (workdir / "inputs").is_dir() else {}
        files = {f"inputs/{name}": data for name, data in files.items()}
        shipped = {
            "kind": inputs.kind,
            "prompt": inputs.prompt,
            "negative_prompt": inputs.negative_prompt,
            "image": inputs.image.relative_to(workdir).as_posix() if inputs.image else None,
            "views": inputs.views.relative_to(workdir).as_posix() if inputs.views else None,
        }
        files_ref = ray.put(files)  # one copy in the object store, fetched by whichever node runs it
        config_dict = config.to_dict()
        tried: set[str] = set()
        for attempt in range(1, ATTEMPTS + 1):
            worker = self.pool.acquire(avoid=tried)
            with self._lock:
                self._leases[job_id] = worker
                self._placement[job_id] = {"worker": worker.name, "attempt": attempt}
            log.info("job %s%s: attempt %d on %s", job_id, f" ({artist})" if artist else "", attempt, worker.name)
            try:
                result = self._attempt(worker, job_id, shipped, files_ref, config_dict, progress, cancel)
            except WorkerLost as lost:
                tried.add(worker.name)
                if cancel():
                    raise Cancelled() from None
                if attempt == ATTEMPTS:
                    raise Im3dError(
                        "worker_lost",
                        f"the worker process running this job died {ATTEMPTS} times (last: {worker.name}, {lost}); run it again, and if it repeats look at that node's Ray logs (ray logs)",
                    ) from None
                log.warning("job %s: %s died mid-job (%s); retrying once on another worker", job_id, worker.name, lost)
                progress(self._jobs[job_id].stage or "start", 0.0, f"{worker.name} stopped mid-job; retrying on another worker (attempt {attempt + 1} of {ATTEMPTS})")
                continue
            finally:
                with self._lock:
                    self._leases.pop(job_id, None)
                self.pool.release(worker)
            return self._bring_home(result, workdir)
        raise AssertionError("unreachable")

    def _attempt(self, worker: Worker, job_id: str, shipped, files_ref, config_dict, progress, cancel) -> dict[str, Any]:
        ray = self.pool.ray
        workdir = self.store.root / job_id
        running = worker.actor.run.remote(job_id, shipped, files_ref, config_dict)
        cancel_sent = False
        try:
            while True:
                done, _ = ray.wait([running], timeout=POLL_S)
                if cancel() and not cancel_sent:
                    worker.actor.cancel.remote(job_id)
                    cancel_sent = True
                if done:
                    result = ray.get(running)
                    break
                try:
                    update = ray.get(worker.actor.poll.remote(job_id), timeout=POLL_TIMEOUT_S)
                except ray.exceptions.GetTimeoutError:
                    continue  # a busy node: progress catches up at the next poll or with the result
                self._apply(workdir, update, progress)
        except ray.exceptions.RayActorError as error:
            raise WorkerLost(type(error).__name__) from None
        self._apply(workdir, result, progress)
        if result["outcome"] == "cancelled":
            raise Cancelled()
        if result["outcome"] == "failed":
            if result.get("traceback"):
                try:
                    (workdir / "error.log").write_text(result["traceback"], encoding="utf-8")
                except OSError:
                    pass
            raise Im3dError(result["code"], result["message"])
        return result

    @staticmethod
    def _apply(workdir: Path, update: Mapping[str, Any], progress) -> None:
        """Write the previews a worker sent, then replay its progress events here."""
        for name, data in (update.get("previews") or {}).items():
            if FILE_NAME_RE.match(name):
                atomic_write_bytes(workdir / "previews" / name, data)
        for stage, fraction, message, preview in update.get("events") or []:
            progress(stage, fraction, message, workdir / "previews" / preview if preview else None)

    @staticmethod
    def _bring_home(result: Mapping[str, Any], workdir: Path) -> dict[str, Path]:
        """Artifacts from the worker into the job folder, each checked against the worker's sha256."""
        artifacts = {}
        for entry in result["artifacts"]:
            data = entry["data"]
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise Im3dError("internal_error", f"artifact {entry['name']} changed on its way from the worker (sha256 mismatch); run the job again")
            target = workdir.joinpath(*safe_relative(entry["path"]).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
            artifacts[entry["name"]] = target
        return artifacts

    # -- commands and queries
    def cancel(self, job_id: str) -> dict[str, Any]:
        status = super().cancel(job_id)
        with self._lock:
            worker = self._leases.get(job_id)
        if worker is not None:
            worker.actor.cancel.remote(job_id)  # reaches the worker now, not at the next poll
        return status

    @property
    def running_job(self) -> str | None:
        with self._lock:
            running = [self._jobs[j] for j in self._leases]
        return min(running, key=lambda j: j.started or 0).id if running else None

    def _public(self, job: Job) -> dict[str, Any]:
        status = super()._public(job)
        placement = self._placement.get(job.id)
        status["worker"] = placement["worker"] if placement else None
        status["attempt"] = placement["attempt"] if placement else None
        status["artist"] = self._artist.get(job.id) or None
        if job.state == "queued":
            position = self._queue.positions().get(job.id)
            status["queue_position"] = position
            mean = sum(self._durations) / len(self._durations) if self._durations else None
            status["eta_s"] = queued_eta(position or 0, len(self.pool.workers) if self.pool else 1, mean)
        return status

    def device(self) -> str:
        devices = sorted({str(w.get("device")) for w in self.workers() if w.get("alive")})
        return ", ".join(devices) if devices else "none"

    def models_loaded(self) -> list[str]:
        return sorted({m for w in self.workers() for m in w.get("models_loaded") or []})

    def workers(self) -> list[dict[str, Any]]:
        if self.pool is None:
            return []
        return self.pool.describe()
