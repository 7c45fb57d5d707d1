"""End to end through the real pipeline: upload a tiny views zip, reconstruct, download verified artifacts."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from fastapi.testclient import TestClient

from im3d.config import Config
from im3d.server import create_app
from im3d.testing.synthetic import ball_views_zip

TOKEN = "e2e-token-" + "z" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {
    "recon": {"steps": 30, "image_size": 32, "init_points": 500, "lpips_weight": 0.0, "msssim_weight": 0.0, "l1_weight": 1.0, "backend": "torch"},
    "mesh": {"grid_resolution": 32, "face_budget": 500, "texture_size": 64},
}


def sphere_views_zip(num_views=6, size=32) -> bytes:
    """RGBA renders of a centred ball (alpha is the mask), as a NeRF-synthetic style zip."""
    return ball_views_zip(num_views, size, green_step=20)


@pytest.mark.slow  # about a minute on a 2-core CPU (torch import, fitting, marching cubes)
def test_reconstruct_job_through_the_real_pipeline(tmp_path):
    pytest.importorskip("im3d.pipeline")
    config = Config()
    config.pipeline.device = "cpu"
    app = create_app(config, TOKEN, jobs_dir=tmp_path / "jobs")  # default runner: im3d.pipeline.run_job
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        upload = client.post("/v1/uploads", headers={**AUTH, "Content-Type": "application/zip"}, content=sphere_views_zip())
        assert upload.status_code == 201, upload.text
        created = client.post("/v1/jobs", headers=AUTH, json={"kind": "reconstruct", "views": upload.json()["upload_id"], "preset": "fast", "overrides": TINY})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while (status := client.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["state"] == "succeeded", status
        names = {a["name"] for a in status["artifacts"]}
        assert {"mesh.glb", "splats.ply", "preview.png", "metrics.json", "config.json"} <= names
        for artifact in status["artifacts"]:
            data = client.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}", headers=AUTH).content
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        glb = client.get(f"/v1/jobs/{job_id}/artifacts/mesh.glb", headers=AUTH).content
        assert glb[:4] == b"glTF"
        saved = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/config.json", headers=AUTH).content)
        assert saved["recon"]["steps"] == 30 and saved["recon"]["image_size"] == 32
        assert client.get("/v1/health", headers=AUTH).json()["device"] == "cpu"
        assert status["previews"], "the fitting loop reported no preview"
        assert client.get(f"/v1/jobs/{job_id}/previews/{status['previews'][-1]}", headers=AUTH).status_code == 200
