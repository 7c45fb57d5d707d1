"""Cancel at every stage boundary, including after the last stage, never ends `succeeded`.

A planted bug let a job cancelled after its last stage report `succeeded` with a manifest: the
pipeline checks `cancel()` only between steps, so a cancel that arrives once the last stage is done
is the service's to honour. Boundaries covered: before each stage, after the last one (the run
function returns its artifacts without looking at `cancel()` again), and while the manifest is
being written. The real pipeline cancelled at its last stage: tests/test_real_paths.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from im3d.config import Config
from im3d.errors import Cancelled
from im3d.service.store import JobStore
from im3d.service.worker import JobManager

STAGES = ("load", "fit", "mesh", "export")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def wait_final(manager, job_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = manager.status(job_id)
        if status["state"] in FINAL:
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {manager.status(job_id)['state']} after {timeout} s")


class Boundary:
    """A run function whose four stages call `at_boundary(index)` before each stage and after the last."""

    def __init__(self, cancel_at: int | None):
        self.cancel_at = cancel_at
        self.manager: JobManager | None = None
        self.job_id: str | None = None
        self.stages_run: list[str] = []

    def at_boundary(self, index: int) -> None:
        if index == self.cancel_at:
            # The artist presses Cancel exactly here (the HTTP route calls the same method).
            status = self.manager.cancel(self.job_id)
            assert status["state"] == "running"

    def __call__(self, inputs, workdir, config, progress, cancel):
        workdir = Path(workdir)
        for index, stage in enumerate(STAGES):
            self.at_boundary(index)
            if cancel():
                raise Cancelled()
            progress(stage, index / len(STAGES), f"{stage} running", None)
            self.stages_run.append(stage)
            (workdir / f"{stage}.bin").write_bytes(stage.encode() * 10)
        # All artifacts written; a cancel now is "after the last stage": this runner returns
        # normally without checking `cancel()` again, like a pipeline whose last check has passed.
        (workdir / "mesh.glb").write_bytes(b"glTF" + b"\0" * 60)
        (workdir / "metrics.json").write_text(json.dumps({"stages": self.stages_run}))
        self.at_boundary(len(STAGES))
        return {"mesh.glb": workdir / "mesh.glb", "metrics.json": workdir / "metrics.json"}


@pytest.fixture
def run_with(tmp_path):
    managers = []

    def run(runner):
        manager = JobManager(JobStore(tmp_path / f"jobs{len(managers)}"), run_fn=runner, config=Config())
        manager.start()
        managers.append(manager)
        runner.manager = manager
        # The worker is idle until submit returns and the job id is known to the runner.
        with manager._lock:
            runner.job_id = manager.submit({"kind": "generate", "prompt": "a cube", "seed": 1})
        return manager, wait_final(manager, runner.job_id)

    yield run
    for manager in managers:
        manager.shutdown(timeout=5)


@pytest.mark.parametrize("boundary", range(len(STAGES) + 1), ids=[f"before_{s}" for s in STAGES] + ["after_last"])
def test_cancel_at_each_boundary_ends_cancelled_without_manifest(run_with, boundary, monkeypatch):
    hashed = []
    original = JobStore.write_manifest
    monkeypatch.setattr(JobStore, "write_manifest", lambda store, job_id, artifacts: hashed.append(job_id) or original(store, job_id, artifacts))
    runner = Boundary(cancel_at=boundary)
    manager, status = run_with(runner)
    assert hashed == []  # a cancelled job does no more work: its artifacts are not even hashed
    assert status["state"] == "cancelled", status
    assert status["error"] is None and status["artifacts"] == []
    assert runner.stages_run == list(STAGES[:boundary])
    job_dir = manager.store.root / runner.job_id
    assert not (job_dir / "manifest.json").exists()
    assert manager.store.artifact_path(runner.job_id, "mesh.glb") is None
    assert json.loads((job_dir / "job.json").read_text())["state"] == "cancelled"
    expected_stage = STAGES[boundary - 1] if boundary > 0 else ""
    assert status["stage"] == expected_stage
    assert status["message"] == f"cancelled during {expected_stage or 'start-up'}"


def test_without_cancel_the_same_runner_succeeds(run_with):
    runner = Boundary(cancel_at=None)
    manager, status = run_with(runner)
    assert status["state"] == "succeeded", status
    assert runner.stages_run == list(STAGES)
    assert sorted(a["name"] for a in status["artifacts"]) == ["mesh.glb", "metrics.json"]
    assert (manager.store.root / runner.job_id / "manifest.json").is_file()


def test_cancel_while_the_manifest_is_written_does_not_succeed(run_with, monkeypatch):
    """The last moment a cancel can arrive: after the run function returned, during hashing."""
    runner = Boundary(cancel_at=None)
    original = JobStore.write_manifest

    def slow_manifest(store, job_id, artifacts):
        entries = original(store, job_id, artifacts)
        runner.manager.cancel(job_id)  # arrives after the manifest file exists, before the state changes
        return entries

    monkeypatch.setattr(JobStore, "write_manifest", slow_manifest)
    manager, status = run_with(runner)
    assert status["state"] == "cancelled", status
    assert status["artifacts"] == []
    assert not (manager.store.root / runner.job_id / "manifest.json").exists()

