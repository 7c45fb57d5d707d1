"""`server.executor = "ray"` on a real local Ray cluster (127.0.0.1): two worker actors, each
reserving one unit of a custom resource that stands in for a GPU; the stand-in job
(`scaleout_runners.standin_job`) is injected through create_app's run_fn, as for local tests.

One cluster and one API app serve the module (starting Ray and its actor processes costs seconds
on two cores); every test waits for its own jobs and leaves both workers idle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from scaleout_runners import kill_ray_processes_of, standin_job
from service_runners import tiny_png

from im3d.config import Config
from im3d.server import create_app
from im3d.request import JobRequest
from im3d.service.fair_queue import FairQueue, queued_eta
from im3d.service.store import Job
from im3d.service.tokens import add_artist, revoke_artist

ray = pytest.importorskip("ray")  # in the dev group for every Python the lock resolves Ray for

TESTS_DIR = Path(__file__).resolve().parent
ADMIN_TOKEN = "admin-token-" + "y" * 32
BASE = "http://127.0.0.1:8765"
GPU = "im3d_test_gpu"  # the custom resource standing in for a GPU


@pytest.fixture(scope="module")
def ray_cluster():
    """A single-node Ray cluster on 127.0.0.1, small; shut down (and its processes gone) after."""
    quiet_start = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0", "RAY_enable_worker_prestart": "0"}
    old_env = {name: os.environ.get(name) for name in ("PYTHONPATH", *quiet_start)}
    # Ray's processes inherit these: workers import scaleout_runners by name; no usage report; no
    # metrics and no idle workers started with the node, which on a loaded two-core machine compete
    # with the agent the raylet waits for.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), old_env["PYTHONPATH"]) if p)
    os.environ.update(quiet_start)
    temp_dir = tempfile.mkdtemp(prefix="im3d-ray-")  # short: Ray's socket paths must stay < 108 bytes
    settings = dict(
        _temp_dir=temp_dir,
        num_cpus=2,
        num_gpus=0,
        resources={GPU: 2},
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        for attempt in (1, 2):
            try:
                ray.init(**settings)
                break
            except Exception as error:  # noqa: BLE001 - see below
                # Ray's raylet waits a fixed 15 s for its Python agent to start, ray.init 30 s for the
                # raylet: on a starved machine (load far above the cores) the node cannot start.
                if "timed out during startup" not in str(error):
                    raise
                ray.shutdown()
                kill_ray_processes_of(temp_dir)
                if attempt == 2:
                    pytest.skip(f"Ray's node could not start within its fixed start-up timeouts, twice (load average {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores)")
        yield ray
    finally:
        ray.shutdown()
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        kill_ray_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def studio(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    tokens_file = root / "tokens"
    tokens = {name: add_artist(tokens_file, name) for name in ("alice", "bob", "carol")}
    config = Config()
    config.server.executor = "ray"
    config.server.ray_workers = 2
    config.server.ray_num_gpus = 0
    config.server.ray_resource = GPU
    config.server.tokens_file = str(tokens_file)
    config.server.max_queue_per_artist = 4
    # A job the previous API node was running when it died: it comes back interrupted, as with local.
    orphan = root / "jobs" / "20250101-120000-abcdef"
    orphan.mkdir(parents=True)
    request = {**JobRequest(kind="generate", prompt="a teapot").model_dump(), "seed": 1}
    orphan_job = Job(id=orphan.name, kind="generate", request=request, config=Config().to_dict(), state="running", started=time.time())
    (orphan / "job.json").write_text(json.dumps(orphan_job.record()))
    (orphan / "manifest.json").write_text('{"artifacts": []}')
    app = create_app(config, ADMIN_TOKEN, run_fn=standin_job, jobs_dir=root / "jobs")
    with TestClient(app, base_url=BASE) as client:
        client.tokens = tokens
        client.tokens_file = tokens_file
        client.jobs_dir = root / "jobs"
        yield client


def auth(client, artist):
    return {"Authorization": f"Bearer {client.tokens[artist]}"}


def submit(client, artist, prompt, **fields):
    response = client.post("/v1/jobs", json={"kind": "generate", "prompt": prompt, **fields}, headers=auth(client, artist))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def status(client, job_id, artist="alice"):
    return client.get(f"/v1/jobs/{job_id}", headers=auth(client, artist)).json()


def wait_for(client, job_id, predicate, timeout=60.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        current = status(client, job_id)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"timed out; last status {current}"
        time.sleep(interval)


def finished(s):
    return s["state"] in ("succeeded", "failed", "cancelled", "interrupted")


def health(client):
    response = client.get("/v1/health", headers=auth(client, "alice"))
    assert response.status_code == 200
    return response.json()


def wait_workers_alive(client, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        workers = health(client)["workers"]
        if len(workers) == 2 and all(w["alive"] for w in workers):
            return workers
        assert time.monotonic() < deadline, f"workers not back: {workers}"
        time.sleep(0.2)


def test_health_lists_two_workers_in_their_own_processes(studio):
    workers = wait_workers_alive(studio)
    body = health(studio)
    assert body["executor"] == "ray"
    assert [w["name"] for w in workers] == ["worker-1", "worker-2"]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids  # actor processes, not the API node
    assert all(w["device"] for w in workers) and all(isinstance(w["models_loaded"], list) for w in workers)


def test_a_job_running_when_the_api_node_died_comes_back_interrupted(studio):
    job = status(studio, "20250101-120000-abcdef")
    assert job["state"] == "interrupted" and job["error"]["code"] == "interrupted"
    assert not (studio.jobs_dir / job["id"] / "manifest.json").exists()


def test_inputs_and_artifacts_travel_through_the_object_store(studio):
    png = tiny_png(77)
    upload = studio.post("/v1/uploads", content=png, headers={**auth(studio, "alice"), "Content-Type": "image/png"})
    assert upload.status_code == 201
    job_id = submit(studio, "alice", "steps=1", image=upload.json()["upload_id"])
    final = wait_for(studio, job_id, finished)
    assert final["state"] == "succeeded", final
    names = {a["name"]: a for a in final["artifacts"]}
    assert set(names) == {"mesh.glb", "preview.png", "metrics.json", "where.json", "input_echo.png"}
    echo = studio.get(f"/v1/jobs/{job_id}/artifacts/input_echo.png", headers=auth(studio, "alice"))
    assert echo.content == png
    for name, entry in names.items():
        data = studio.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth(studio, "alice")).content
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    where = json.loads(studio.get(f"/v1/jobs/{job_id}/artifacts/where.json", headers=auth(studio, "alice")).content)
    job_dir = studio.jobs_dir / job_id
    assert where["pid"] != os.getpid()
    assert Path(where["workdir"]) != job_dir and not Path(where["workdir"]).exists()  # a scratch folder on the worker, removed
    assert final["worker"] in ("worker-1", "worker-2") and final["attempt"] == 1 and final["artist"] == "alice"
    # The previews the worker reported were carried over and are served from the API node.
    assert final["previews"] and studio.get(f"/v1/jobs/{job_id}/previews/{final['previews'][-1]}", headers=auth(studio, "alice")).status_code == 200


def test_two_artists_interleave_round_robin_and_see_their_place_in_line(studio):
    wait_workers_alive(studio)
    # Two artists new to the studio (added to the tokens file while it runs, so neither has been
    # served yet): carol keeps both workers busy while dora (4 jobs first) and eve (2 after) queue.
    for name in ("dora", "eve"):
        studio.tokens[name] = add_artist(studio.tokens_file, name)
    blockers = [submit(studio, "carol", "hold=fit steps=30 step_s=0.05") for _ in range(2)]
    for job_id in blockers:
        wait_for(studio, job_id, lambda s: s["state"] == "running")
    dora = [submit(studio, "dora", f"steps=1 n={i}") for i in range(4)]
    refused = studio.post("/v1/jobs", json={"kind": "generate", "prompt": "one too many"}, headers=auth(studio, "dora"))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    assert "max_queue_per_artist" in refused.json()["error"]["message"]
    eve = [submit(studio, "eve", f"steps=1 n={i}") for i in range(2)]

    expected = [dora[0], eve[0], dora[1], eve[1], dora[2], dora[3]]
    positions = {job_id: status(studio, job_id)["queue_position"] for job_id in expected}
    running = [status(studio, b)["state"] for b in blockers]
    assert running == ["running", "running"], "the blockers finished before the queue could be read"
    assert positions == {job_id: place for place, job_id in enumerate(expected, 1)}
    assert health(studio)["queue_length"] == 6

    finals = [wait_for(studio, job_id, finished) for job_id in blockers + expected]
    assert all(f["state"] == "succeeded" for f in finals), [f["error"] for f in finals]
    started = sorted(expected, key=lambda job_id: status(studio, job_id)["started"])
    assert started == expected
    assert [f["artist"] for f in finals] == ["carol"] * 2 + ["dora", "eve", "dora", "eve", "dora", "dora"]


def test_killing_a_worker_mid_job_retries_on_the_other_and_finishes(studio):
    wait_workers_alive(studio)
    job_id = submit(studio, "alice", "hold=fit steps=40 step_s=0.05")
    running = wait_for(studio, job_id, lambda s: s["stage"] == "fit" and s["progress"] > 0.2)
    first = running["worker"]
    pid = next(w["pid"] for w in health(studio)["workers"] if w["name"] == first)
    os.kill(pid, signal.SIGKILL)

    final = wait_for(studio, job_id, finished)
    assert final["state"] == "succeeded", final
    assert final["attempt"] == 2 and final["worker"] != first
    assert sorted(a["name"] for a in final["artifacts"]) == ["mesh.glb", "metrics.json", "preview.png", "where.json"]
    manifest = json.loads((studio.jobs_dir / job_id / "manifest.json").read_text())
    assert all(not e["path"].startswith("partial_") for e in manifest["artifacts"])
    where = json.loads(studio.get(f"/v1/jobs/{job_id}/artifacts/where.json", headers=auth(studio, "alice")).content)
    assert where["pid"] != pid
    # Ray restarts the killed worker process: the pool is back to two, the killed one in a new process.
    workers = wait_workers_alive(studio)
    assert pid not in {w["pid"] for w in workers}


def test_cancel_reaches_the_worker_within_one_second(studio):
    wait_workers_alive(studio)
    job_id = submit(studio, "bob", "hold=fit steps=400 step_s=0.05")
    wait_for(studio, job_id, lambda s: s["stage"] == "fit" and s["state"] == "running")
    asked = time.monotonic()
    studio.post(f"/v1/jobs/{job_id}/cancel", headers=auth(studio, "bob"))
    final = wait_for(studio, job_id, finished, timeout=10)
    took = time.monotonic() - asked
    assert final["state"] == "cancelled", final
    assert took < 1.0, f"cancel took {took:.2f} s to stop the job on its worker"
    assert final["artifacts"] == [] and not (studio.jobs_dir / job_id / "manifest.json").exists()


def test_a_revoked_token_is_refused_and_the_others_keep_working(studio, caplog):
    assert studio.get("/v1/health", headers=auth(studio, "bob")).status_code == 200
    assert studio.get("/v1/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    assert revoke_artist(studio.tokens_file, "bob")
    refused = studio.get("/v1/health", headers=auth(studio, "bob"))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert studio.get("/v1/health", headers=auth(studio, "alice")).status_code == 200
    with caplog.at_level("INFO", logger="im3d.jobs"):
        job_id = submit(studio, "carol", "steps=1")
    assert f"job {job_id} queued (generate) for carol" in caplog.text
    assert all(token not in caplog.text for token in studio.tokens.values())
    assert wait_for(studio, job_id, finished)["state"] == "succeeded"


# -- the fair queue itself (no Ray) ----------------------------------------------------------------

def test_fair_queue_serves_the_least_recently_served_artist():
    queue = FairQueue()
    for i in range(3):
        queue.append(f"a{i}", "alice")
    assert queue.popleft() == "a0"
    queue.append("b0", "bob")
    queue.append("b1", "bob")
    assert queue.order() == ["b0", "a1", "b1", "a2"]
    queue.remove("a1")
    assert queue.positions() == {"b0": 1, "a2": 2, "b1": 3}
    assert [queue.popleft() for _ in range(3)] == ["b0", "a2", "b1"] and not queue
    assert queued_eta(3, 2, 10.0) == 30.0 and queued_eta(1, 2, None) is None


@pytest.mark.slow
def test_a_job_whose_worker_dies_twice_fails_with_worker_lost(studio):
    wait_workers_alive(studio)
    job_id = submit(studio, "alice", "hold=fit steps=200 step_s=0.05")
    killed = []
    for attempt in (1, 2):
        running = wait_for(studio, job_id, lambda s: s["attempt"] == attempt and s["stage"] == "fit" and s["state"] == "running")
        pid = next(w["pid"] for w in health(studio)["workers"] if w["name"] == running["worker"])
        os.kill(pid, signal.SIGKILL)
        killed.append(running["worker"])
    final = wait_for(studio, job_id, finished)
    assert final["state"] == "failed" and final["error"]["code"] == "worker_lost", final
    assert killed[0] != killed[1]  # the retry went to the other worker
    assert final["artifacts"] == [] and not (studio.jobs_dir / job_id / "manifest.json").exists()
    wait_workers_alive(studio)


# -- the tokens file itself (no Ray) ---------------------------------------------------------------

def test_tokens_file_rules_and_a_broken_edit_fails_closed(tmp_path):
    from im3d.config import ConfigError
    from im3d.service.tokens import TokenBook, parse_tokens

    good = "# studio\nalice " + "a" * 20 + "\nbob " + "b" * 20 + "  # lead\n"
    assert parse_tokens(good) == {"alice": "a" * 20, "bob": "b" * 20}
    for bad, why in (("alice short", "shorter than 16"), ("alice " + "a" * 20 + "\nbob " + "a" * 20, "twice"),
                     ("local " + "l" * 20, "not a usable artist name"), ("alice", "expected 'name token'")):
        with pytest.raises(ConfigError, match=why):
            parse_tokens(bad)
    path = tmp_path / "tokens"
    path.write_text(good)
    book = TokenBook(path, local_token="m" * 20)
    assert book.artist_for("a" * 20) == "alice" and book.artist_for("m" * 20) == "local" and book.artist_for("z" * 20) is None
    path.write_text(good + "carol\n")  # a half-typed line: every artist token is refused until fixed
    assert book.artist_for("a" * 20) is None and book.artist_for("m" * 20) == "local"
    path.write_text(good)
    assert book.artist_for("b" * 20) == "bob"
    with pytest.raises(ConfigError, match="cannot read server.tokens_file"):
        TokenBook(tmp_path / "missing")
