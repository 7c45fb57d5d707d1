"""The backend as a real process on 127.0.0.1: SIGKILL mid-job and restart, SIGTERM, a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parent


class Backend:
    """`python -m im3d.server` with the test runner; stopped by the fixture's finalizer."""

    def __init__(self, root: Path):
        self.root = root
        self.jobs_dir = root / "jobs"
        self.token_file = root / "secret" / "token"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.stderr_path = root / "backend.err"

    def start(self, *extra: str, file_size_limit: int | None = None) -> "Backend":
        def limit_files():  # runs in the child: a tiny RLIMIT_FSIZE stands in for a full disk
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "im3d.server", "--jobs-dir", str(self.jobs_dir), "--port", "0",
                   "--token-file", str(self.token_file), "--runner", "service_runners:staged_job", *extra]
        self.stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True,
            preexec_fn=limit_files if file_size_limit else None,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("IM3D-READY "):
                self.url = line.split()[1]
                break
            if not line and self.process.poll() is not None:
                raise AssertionError(f"backend exited early: {self.stderr_path.read_text()}")
        else:
            raise AssertionError("backend did not print IM3D-READY within 30 s")
        assert self.url.startswith("http://127.0.0.1:")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        return self

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, states=("succeeded", "failed", "cancelled", "interrupted"), timeout=15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job(job_id)
            if status["state"] in states:
                return status
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} stuck in {status}")

    def stop(self, sig=signal.SIGKILL) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(5)
        self.process.stdout.close()
        self.stderr.close()
        self.http.close()
        self.process = None
        return code


@pytest.fixture
def backend(tmp_path):
    started = []

    def make(*extra, **kwargs):
        b = Backend(tmp_path).start(*extra, **kwargs)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop(signal.SIGKILL)


def test_sigkill_mid_job_then_restart(backend, tmp_path):
    first = backend()
    if os.name == "posix":
        assert oct(first.token_file.stat().st_mode & 0o777) == "0o600"
    done = first.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1"}).json()["id"]
    assert first.wait(done)["state"] == "succeeded"
    job_id = first.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1000 step_s=0.01 hold=fit"}).json()["id"]
    queued = first.http.post("/v1/jobs", json={"kind": "generate", "prompt": "x"}).json()["id"]
    while first.job(job_id)["stage"] != "fit":
        time.sleep(0.02)
    time.sleep(0.2)
    first.stop(signal.SIGKILL)
    job_dir = first.jobs_dir / job_id
    partials = sorted(p.name for p in job_dir.glob("partial_*.bin"))
    assert "partial_fit.bin" in partials  # the killed job left partial files behind

    second = backend()
    status = second.job(job_id)
    assert status["state"] == "interrupted" and status["error"]["code"] == "interrupted" and status["artifacts"] == []
    assert second.job(queued)["state"] == "interrupted"
    assert not (job_dir / "manifest.json").exists()
    listed = set()
    for manifest in second.jobs_dir.glob("*/manifest.json"):
        listed |= {e["path"] for e in json.loads(manifest.read_text())["artifacts"]}
    assert not any(name.startswith("partial_") for name in listed)
    # The job finished before the crash is intact and still served; new jobs run.
    old = second.job(done)
    assert old["state"] == "succeeded" and len(old["artifacts"]) == 3
    mesh = next(a for a in old["artifacts"] if a["name"] == "mesh.glb")
    assert hashlib.sha256(second.http.get(f"/v1/jobs/{done}/artifacts/mesh.glb").content).hexdigest() == mesh["sha256"]
    fresh = second.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1"}).json()["id"]
    assert second.wait(fresh)["state"] == "succeeded"

    # SIGTERM is a graceful stop: the running job is cancelled and recorded as interrupted.
    running = second.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1000 step_s=0.01 hold=fit"}).json()["id"]
    while second.job(running)["stage"] != "fit":
        time.sleep(0.02)
    asked = time.monotonic()
    second.stop(signal.SIGTERM)
    assert time.monotonic() - asked < 10
    record = json.loads((second.jobs_dir / running / "job.json").read_text())
    assert record["state"] == "interrupted" and "shut down" in record["message"]
    assert second.token not in (tmp_path / "backend.err").read_text()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE needs a POSIX child process")
def test_full_disk_is_a_clear_failure_and_loses_nothing(backend):
    server = backend("--set", "server.max_upload_mb=4", file_size_limit=64 * 1024)
    small = server.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1 artifact_kb=8"}).json()["id"]
    assert server.wait(small)["state"] == "succeeded"
    large = server.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1 artifact_kb=512"}).json()["id"]
    status = server.wait(large)
    assert status["state"] == "failed" and status["error"]["code"] == "storage_error", status
    assert large in status["error"]["message"] and "free disk space" in status["error"]["message"]
    png = b"\x89PNG\r\n\x1a\n" + b"0" * (1 << 20)
    response = server.http.post("/v1/uploads", content=png, headers={"Content-Type": "image/png"})
    assert response.status_code == 507 and response.json()["error"]["code"] == "storage_error", response.text
    assert not list((server.jobs_dir / "_uploads").iterdir())  # the half-written upload was removed
    # Earlier results are untouched and the backend keeps working.
    kept = server.job(small)
    assert kept["state"] == "succeeded" and len(kept["artifacts"]) == 3
    assert server.http.get(f"/v1/jobs/{small}/artifacts/mesh.glb").status_code == 200
    again = server.http.post("/v1/jobs", json={"kind": "generate", "prompt": "steps=1"}).json()["id"]
    assert server.wait(again)["state"] == "succeeded"


def test_start_up_errors_are_clear(tmp_path, capsys):
    from im3d.server import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["--jobs-dir", str(blocker / "jobs"), "--port", "0", "--token-file", str(tmp_path / "token")])
    err = capsys.readouterr().err
    from im3d.errors import exit_code

    assert code == exit_code("storage_error") != 0 and "storage_error" in err and str(blocker) in err and "Traceback" not in err
    code = main(["--jobs-dir", str(tmp_path / "jobs"), "--port", "0", "--set", "server.host=0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and "allow_remote" in err
