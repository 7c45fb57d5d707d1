"""Artifacts are hashed end to end: the manifest holds real sha256s, the service does not serve a
file whose bytes changed (same size included), and the add-on's client refuses any download whose
size or sha256 differs from the manifest, leaving nothing behind.

A planted bug that served artifacts after a size check only passed the suite (the existing test
changed the file's size). The add-on's client is `im3d_blender/client.py`, bpy-free, loaded here
as a plain module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_runners import staged_job

from im3d.config import Config
from im3d.server import create_app
from im3d.service.store import JobStore
from im3d.service.worker import JobManager

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hash-token-" + "h" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def load_client():
    spec = importlib.util.spec_from_file_location("im3d_addon_client", ROOT / "im3d_blender" / "client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


client_module = load_client()


def finished_job(tmp_path):
    manager = JobManager(JobStore(tmp_path / "jobs"), run_fn=staged_job, config=Config())
    manager.start()
    job_id = manager.submit({"kind": "generate", "prompt": "steps=1", "seed": 3})
    deadline = time.monotonic() + 20
    while manager._jobs[job_id].state in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return manager, job_id


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_the_true_sha256_of_every_artifact(tmp_path):
    manager, job_id = finished_job(tmp_path)
    try:
        status = manager.status(job_id)
        assert status["state"] == "succeeded"
        assert sorted(a["name"] for a in status["artifacts"]) == ["mesh.glb", "metrics.json", "preview.png"]
        for artifact in status["artifacts"]:
            data = (tmp_path / "jobs" / job_id / artifact["name"]).read_bytes()
            assert artifact["size"] == len(data)
            assert artifact["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        manager.shutdown(timeout=5)


def test_same_size_tampering_is_not_served(tmp_path):
    """Bytes changed on disk before the service verified them: a size check alone would serve them."""
    manager, job_id = finished_job(tmp_path)
    try:
        glb = tmp_path / "jobs" / job_id / "mesh.glb"
        size = glb.stat().st_size
        flip_one_byte(glb)
        assert glb.stat().st_size == size
        fresh = JobStore(tmp_path / "jobs")  # a new process's store: nothing verified yet
        assert {a["name"] for a in fresh.verified_artifacts(job_id)} == {"metrics.json", "preview.png"}
        assert fresh.artifact_path(job_id, "mesh.glb") is None
        assert fresh.artifact_path(job_id, "preview.png") is not None
    finally:
        manager.shutdown(timeout=5)


def test_tampered_artifact_over_http_is_refused_by_the_addon_client(tmp_path):
    """The service hashes once per process; a same-size change after that is caught by the client."""
    app = create_app(Config(), TOKEN, run_fn=staged_job, jobs_dir=tmp_path / "jobs")
    with TestClient(app, base_url="http://127.0.0.1:8765") as http:
        job_id = http.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "steps=1", "seed": 2}).json()["id"]
        deadline = time.monotonic() + 20
        while (status := http.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status["state"] == "succeeded"

        class Client(client_module.BackendClient):
            def artifact(self, job, name):  # the real route, through the in-process app
                response = http.get(f"/v1/jobs/{job}/artifacts/{name}", headers=AUTH)
                assert response.status_code == 200, response.text
                return response.content

        client = Client("http://127.0.0.1:8765", TOKEN)
        good = client.download_artifacts(status, tmp_path / "good")
        assert sorted(good) == ["mesh.glb", "metrics.json", "preview.png"]
        assert client_module.verify_downloaded(tmp_path / "good").keys() == good.keys()

        flip_one_byte(tmp_path / "jobs" / job_id / "mesh.glb")
        dest = tmp_path / "bad"
        with pytest.raises(client_module.BackendError) as error:
            client.download_artifacts(status, dest)
        assert error.value.code == "artifact_corrupt" and "sha256" in error.value.message
        assert not dest.exists() or sorted(p.name for p in dest.iterdir()) == []

        # A file kept from an earlier download and changed since is refused on re-import.
        flip_one_byte(tmp_path / "good" / "preview.png")
        with pytest.raises(client_module.BackendError, match="preview.png does not match the sha256"):
            client_module.verify_downloaded(tmp_path / "good")


def artifact(data: bytes, name: str = "mesh.glb"):
    return client_module.Artifact(name, len(data), hashlib.sha256(data).hexdigest())


def test_client_checks_size_and_hash_of_each_download():
    data = b"glTF" + bytes(range(200))
    listed = artifact(data)
    client_module.verify_artifact(data, listed)  # the bytes the manifest lists pass
    same_size = data[:-1] + b"\x00"
    with pytest.raises(client_module.BackendError) as error:
        client_module.verify_artifact(same_size, listed)
    assert error.value.code == "artifact_corrupt" and "does not match the sha256" in error.value.message
    with pytest.raises(client_module.BackendError) as error:
        client_module.verify_artifact(data[:-10], listed)
    assert error.value.code == "artifact_corrupt" and f"{len(data) - 10} bytes" in error.value.message


def test_client_downloads_only_what_the_manifest_lists(tmp_path):
    data = b"glTF" + b"x" * 50
    status = {"id": "job1", "state": "succeeded", "artifacts": [{"name": "mesh.glb", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}

    class Client(client_module.BackendClient):
        fetched: list[str] = []

        def artifact(self, job, name):
            self.fetched.append(name)
            return data

    client = Client("http://127.0.0.1:1", "t" * 20)
    with pytest.raises(client_module.BackendError) as error:
        client.download_artifacts(status, tmp_path / "a", names=["mesh.glb", "splats.ply"])
    assert error.value.code == "artifact_corrupt" and "does not list splats.ply" in error.value.message
    assert client.fetched == []  # refused before any download
    with pytest.raises(client_module.BackendError) as error:
        client.download_artifacts({**status, "state": "cancelled"}, tmp_path / "b")
    assert error.value.code == "job_not_finished"
    files = client.download_artifacts(status, tmp_path / "c")
    assert files["mesh.glb"].read_bytes() == data and client.fetched == ["mesh.glb"]
