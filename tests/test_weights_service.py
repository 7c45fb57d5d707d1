"""Models through the service: preflight at submit, GET /v1/models, background pull with progress, cancel."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from hub_server import HubServer, HubState, Repo, tiny_diffusers_repo
from test_weights_pull import hub_env  # noqa: F401 - the fixture: empty caches, Hub reachable

from im3d.config import Config
from im3d.server import create_app

TOKEN = "t" * 32
BASE = "http://127.0.0.1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


def _wait_pull(client: TestClient, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 30.0) -> tuple[dict, list[float]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/v1/models/pull", headers=AUTH).json()
        seen.append(status["progress"])
        if status["state"] in until:
            return status, seen
        time.sleep(0.05)
    raise AssertionError(f"pull still {status} after {timeout}s")


def test_cli_generate_with_empty_caches_fails_at_once_naming_every_model(hub_env, tmp_path):
    env = {**os.environ, "IM3D_DEBUG": ""}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "im3d", "generate", "a mug", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 4, done.stderr  # model_not_found's exit status
    for name, model_id in (("text-to-image", "stabilityai/sdxl-turbo"), ("orbit-video", "stabilityai/sv3d"), ("lpips-vgg", "vgg16-397923af.pth")):
        assert f"{name} ({model_id})" in done.stderr
    assert "im3d models pull text-to-image orbit-video lpips-vgg" in done.stderr
    assert "Download Models" in done.stderr and "huggingface.co/stabilityai/sv3d" in done.stderr
    assert not (tmp_path / "out").exists()  # no stage ran, nothing written
    # the check itself, in process, is well under a second (the subprocess adds interpreter start-up)
    import huggingface_hub.file_download  # noqa: F401 - import time is interpreter start-up, not the check
    import im3d.weights.cli  # noqa: F401
    from im3d.cli import main

    start_in = time.monotonic()
    assert main(["generate", "a mug", "--out", str(tmp_path / "out2")]) == 4
    assert time.monotonic() - start_in < 1.0
    assert elapsed < 15.0, elapsed
    # a job that needs no weights passes preflight: diffusion off, LPIPS off
    from im3d.config import load_config
    from im3d.weights import preflight

    preflight(load_config(overrides={"diffusion": {"enabled": False}, "recon": {"lpips_weight": 0.0}}), {"kind": "reconstruct"})


def test_service_refuses_the_submit_with_the_same_error_and_lists_models(hub_env, tmp_path):
    app = create_app(Config(), TOKEN, jobs_dir=tmp_path / "jobs")  # the real pipeline: preflight on
    with TestClient(app, base_url=BASE) as client:
        start = time.monotonic()
        r = client.post("/v1/jobs", json={"kind": "generate", "prompt": "a mug"}, headers=AUTH)
        assert time.monotonic() - start < 1.0
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found"
        from im3d.weights import missing_message, missing_models

        assert error["message"] == missing_message(missing_models(Config(), {"kind": "generate"}))
        assert client.get("/v1/jobs", headers=AUTH).json()["jobs"] == []  # nothing queued
        # with an image, text-to-image is not needed; the fast preset needs LPIPS-alex instead of VGG
        listing = client.get("/v1/models?preset=fast", headers=AUTH).json()
        assert [m["name"] for m in listing["models"]] == ["text-to-image", "orbit-video", "lpips-alex"]
        assert listing["missing"] == ["text-to-image", "orbit-video", "lpips-alex"]
        assert listing["pull_command"] == "im3d models pull text-to-image orbit-video lpips-alex"
        sv3d = listing["models"][1]
        assert sv3d["gated"] and sv3d["licence_url"] == "https://huggingface.co/stabilityai/sv3d" and sv3d["source"] == "huggingface-sgm"
        assert client.get("/v1/models/pull", headers=AUTH).status_code == 404
        assert client.get("/v1/models", headers={}).status_code == 401


def test_service_pull_runs_in_the_background_with_progress_token_and_cancel(hub_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    state = HubState(repos={"test/tiny": Repo(tiny_diffusers_repo(300_000)), "test/gated": Repo(tiny_diffusers_repo(1024), gated=True)})
    overrides = {"diffusion": {"text_to_image_model": "test/tiny", "orbit_model": "test/gated"}, "recon": {"lpips_weight": 0.0}}
    with HubServer(state) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        try:
            app = create_app(Config(), TOKEN, jobs_dir=tmp_path / "jobs")
            with TestClient(app, base_url=BASE) as client:
                # cancel: a slow transfer is stopped between chunks and reported cancelled
                state.slow = 0.05
                r = client.post("/v1/models/pull", json={"names": ["text-to-image"], "overrides": overrides}, headers=AUTH)
                assert r.status_code == 202 and r.json()["state"] == "running"
                _wait_pull_progress(client)
                assert client.post("/v1/models/pull/cancel", headers=AUTH).status_code == 200
                status, _ = _wait_pull(client)
                assert status["state"] == "cancelled"
                # the whole pull, watched by polling: progress rises to 1 and the model is present
                state.slow = 0.01
                client.post("/v1/models/pull", json={"names": ["text-to-image"], "overrides": overrides}, headers=AUTH)
                status, seen = _wait_pull(client)
                assert status["state"] == "succeeded", status
                assert seen == sorted(seen) and seen[-1] == 1.0 and any(0 < f < 1 for f in seen)
                assert status["models"][0]["status"] == "present"
                # gated without a token: failed with the licence page; with the token in the body: pulled
                client.post("/v1/models/pull", json={"names": ["orbit-video"], "overrides": overrides}, headers=AUTH)
                status, _ = _wait_pull(client)
                assert status["state"] == "failed" and status["error"]["code"] == "model_gated"
                assert "https://huggingface.co/test/gated" in status["error"]["message"]
                body = {"names": ["orbit-video"], "overrides": overrides, "token": state.token}
                client.post("/v1/models/pull", json=body, headers=AUTH)
                status, _ = _wait_pull(client)
                assert status["state"] == "succeeded", status
                assert state.token not in json.dumps(status)
                bad = client.post("/v1/models/pull", json={"names": ["no-such-model"], "overrides": overrides}, headers=AUTH)
                assert bad.status_code == 422 and "text-to-image" in bad.json()["error"]["message"]
        finally:
            del os.environ["HF_ENDPOINT"]
    assert state.token not in caplog.text
    on_disk = [p for p in tmp_path.rglob("*") if p.is_file() and state.token.encode() in p.read_bytes()]
    assert on_disk == []


def _wait_pull_progress(client: TestClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/v1/models/pull", headers=AUTH).json()
        if 0 < status["progress"] < 1:
            return
        assert status["state"] == "running", status
        time.sleep(0.02)
    raise AssertionError("no progress")
