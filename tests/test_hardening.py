"""Issue #13: nothing a request sends can freeze, exhaust or fool the backend.

One test per class of attack or careless input: decompression bombs in uploads, memory that
follows the input instead of the config, absurd settings, cancel during long loops, paths outside
an upload in any split, a corrupt job record, zip bombs, garbage reported as success, tracebacks
from the CLI, slow request heads, files replaced while served, the Host header.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_runners import staged_job, tiny_png

from im3d.config import RANGES, Config, ConfigError, load_config
from im3d.errors import Cancelled, Im3dError
from im3d.server import create_app

TOKEN = "test-token-" + "h" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://127.0.0.1:8765"


@pytest.fixture
def client(tmp_path):
    app = create_app(Config(), TOKEN, run_fn=staged_job, jobs_dir=tmp_path / "jobs")
    with TestClient(app, base_url=BASE) as test_client:
        yield test_client


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: decoding it would allocate
    width*height pixels; reading its header costs nothing."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def views_zip(frames: dict[str, bytes], splits: dict[str, list[str]] | None = None) -> bytes:
    """A views zip: `frames` {path: bytes}; `splits` {json name: [file_path, ...]} (default: all in transforms.json)."""
    splits = splits or {"transforms.json": [f"./{p}" for p in frames]}
    matrix = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3], [0, 0, 0, 1]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, paths in splits.items():
            archive.writestr(name, json.dumps({"camera_angle_x": 0.7, "frames": [{"file_path": p, "transform_matrix": matrix} for p in paths]}))
        for path, data in frames.items():
            archive.writestr(path, data)
    return buffer.getvalue()


def upload(client, data: bytes, content_type: str):
    return client.post("/v1/uploads", headers={**AUTH, "Content-Type": content_type}, content=data)


# -- 1. bounded by construction -------------------------------------------------------------------


def test_tiny_upload_that_would_decode_to_billions_of_pixels_is_refused_at_upload(client, tmp_path):
    for width, height in ((60_000, 60_000), (9000, 9000)):  # 3.6 G pixels (past Pillow's own limit); 81 M pixels
        bomb = png_header_only(width, height)
        assert len(bomb) < 200
        response = upload(client, bomb, "image/png")
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "image_too_large" and "server.max_image_pixels" in error["message"]
    assert "9000x9000" in error["message"]

    zipped = views_zip({"images/a.png": tiny_png(1), "images/b.png": bomb})
    response = upload(client, zipped, "application/zip")
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_large", response.text
    uploads = tmp_path / "jobs" / "_uploads"
    assert [p.name for p in uploads.iterdir()] == []  # nothing kept, not even the staging folder


def test_frame_count_and_total_pixels_are_capped_at_upload(tmp_path):
    app = create_app(load_config("standard", assignments=["server.max_frames=3"]), TOKEN, run_fn=staged_job, jobs_dir=tmp_path / "jobs")
    frames = {f"images/{i}.png": tiny_png(i) for i in range(4)}
    with TestClient(app, base_url=BASE) as client:
        response = upload(client, views_zip(frames), "application/zip")
    assert response.status_code == 400 and "server.max_frames" in response.json()["error"]["message"], response.text


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from im3d.cameras import orbit_cameras, write_transforms
    from im3d.config import load_config
    from im3d.pipeline import StageProgress, _load_views
    from im3d.request import JobInputs

    root, side = Path(sys.argv[1]), int(sys.argv[2])
    cams = orbit_cameras(6, elevation_deg=20.0, radius=3.0, fov_deg=40.0, width=side)
    yy, xx = np.mgrid[0:side, 0:side]
    disc = (((xx - side / 2) ** 2 + (yy - side / 2) ** 2) < (side / 3) ** 2).astype(np.uint8) * 255
    rgba = np.dstack([disc, disc // 2, 255 - disc, disc]).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    names = []
    for i in range(6):
        Image.fromarray(rgba).save(root / "images" / f"{i}.png", compress_level=1)
        names.append(f"./images/{i}.png")
    write_transforms(root / "transforms.json", cams, names)
    config = load_config("fast", overrides={"recon": {"image_size": 64}})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train, _ = _load_views(JobInputs("reconstruct", views=root), StageProgress(["load"], None), config)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(train.images.shape[1], (after - before) // 1024)
    """
)


def test_memory_of_loading_views_follows_recon_image_size_not_the_input(tmp_path):
    """6 views of 1536x1536 fitted at 64x64: decoding one image at a time straight to the fit's
    size costs a few tens of MB; decoding all at full size first (the old way) costs > 400 MB."""
    script = tmp_path / "load.py"
    script.write_text(MEMORY_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "views"), "1536"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    size, growth_mb = map(int, run.stdout.split())
    assert size == 64
    assert growth_mb < 150, f"loading 6 views of 1536^2 at recon.image_size 64 grew the process by {growth_mb} MB"


def test_a_job_that_cannot_fit_in_memory_fails_before_it_starts_naming_the_setting(tmp_path, monkeypatch):
    import im3d.memory as memory
    from im3d.pipeline import run_job
    from im3d.request import JobInputs

    monkeypatch.setattr(memory, "available_bytes", lambda: 2.0 * (1 << 30))
    config = load_config("standard", overrides={"mesh": {"grid_resolution": 1024}, "pipeline": {"device": "cpu"}})
    with pytest.raises(Im3dError) as error:
        run_job(JobInputs("generate", "a mug"), tmp_path / "job", config)
    assert error.value.code == "out_of_memory" and "lower mesh.grid_resolution" in error.value.message
    assert not (tmp_path / "job" / "mesh.glb").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"recon": {"steps": 10**9}}, "recon.steps"),
        ({"mesh": {"grid_resolution": 100_000}}, "mesh.grid_resolution"),
        ({"mesh": {"smooth_iterations": 10**7}}, "mesh.smooth_iterations"),
        ({"recon": {"lr_means": -0.1}}, "recon.lr_means"),
        ({"recon": {"max_gaussians": 10**12}}, "recon.max_gaussians"),
        ({"pipeline": {"refinement_rounds": 1000}}, "pipeline.refinement_rounds"),
        ({"diffusion": {"num_views": 10**6}}, "diffusion.num_views"),
    ],
)
def test_absurd_settings_are_refused_with_the_key_and_its_range(client, overrides, key):
    response = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "x", "overrides": overrides})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_config" and key in error["message"] and "must be within [" in error["message"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_settings_are_refused(client, token):
    body = '{"kind": "generate", "prompt": "x", "overrides": {"recon": {"lr_means": %s}}}' % token
    response = client.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 422, response.text
    assert "recon.lr_means: must be a finite number" in response.json()["error"]["message"]
    with pytest.raises(ConfigError, match="finite"):
        load_config("standard", overrides={"mesh": {"threshold": float(token.replace("Infinity", "inf"))}})


def test_every_numeric_setting_has_an_allowed_range():
    import dataclasses

    config = Config()
    numeric = {
        f"{section.name}.{item.name}"
        for section in dataclasses.fields(config)
        for item in dataclasses.fields(getattr(config, section.name))
        if item.type in ("int", "float", "list[float]")
    }
    assert numeric and not numeric - set(RANGES), f"settings without an upper bound: {sorted(numeric - set(RANGES))}"
    for preset in ("fast", "standard", "high"):
        load_config(preset)  # the shipped presets are inside the ranges


# -- 2. cancel ---------------------------------------------------------------------------------


def test_cancel_while_reading_a_big_dataset_stops_within_one_second(tmp_path):
    from PIL import Image

    from im3d.cameras import orbit_cameras, read_transforms, write_transforms

    cams = orbit_cameras(40, elevation_deg=20.0, radius=3.0, fov_deg=40.0, width=256)
    (tmp_path / "images").mkdir()
    image = Image.new("RGBA", (256, 256), (200, 100, 50, 255))
    for i in range(40):
        image.save(tmp_path / "images" / f"{i}.png", compress_level=1)
    write_transforms(tmp_path / "transforms.json", cams, [f"./images/{i}.png" for i in range(40)])
    tripped: dict[str, float] = {}
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            tripped["at"] = time.monotonic()
        return calls["n"] >= 5

    with pytest.raises(Cancelled):
        read_transforms(tmp_path, cancel=cancel)
    assert time.monotonic() - tripped["at"] < 1.0 and calls["n"] == 5


# -- 3. paths contained in every split ----------------------------------------------------------


@pytest.mark.parametrize("outside", ["../../../../etc/hostname", "/etc/hostname"])
def test_a_test_split_path_outside_the_upload_is_refused_at_upload(client, outside):
    frames = {"images/a.png": tiny_png(1), "images/b.png": tiny_png(2)}
    zipped = views_zip(frames, {"transforms.json": ["./images/a.png", "./images/b.png"], "transforms_test.json": [outside]})
    response = upload(client, zipped, "application/zip")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "path_outside_upload" and "transforms_test.json" in error["message"]


def test_the_worker_refuses_a_split_path_outside_the_dataset(tmp_path):
    from im3d.cameras import DatasetError, orbit_cameras, read_transforms, write_transforms

    secret = tmp_path / "secret.png"
    secret.write_bytes(tiny_png(9))
    root = tmp_path / "views"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(tiny_png(1))
    cams = orbit_cameras(1, elevation_deg=10.0, radius=3.0, fov_deg=40.0, width=2)
    write_transforms(root / "transforms_test.json", cams, ["../secret.png"])
    with pytest.raises(DatasetError) as error:
        read_transforms(root, split="test")
    assert error.value.code == "path_outside_upload"


# -- 4. a job store that survives corruption ----------------------------------------------------


def test_a_corrupt_job_record_leaves_the_others_listable(tmp_path):
    from im3d.service.store import JobStore
    from im3d.service.worker import JobManager

    manager = JobManager(JobStore(tmp_path / "jobs"), run_fn=staged_job, config=Config())
    manager.start()
    ids = [manager.submit({"kind": "generate", "prompt": "steps=1"}) for _ in range(3)]
    deadline = time.monotonic() + 30
    while any(manager.status(i)["state"] != "succeeded" for i in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    manager.shutdown(timeout=5)
    truncated, wrong = tmp_path / "jobs" / ids[0] / "job.json", tmp_path / "jobs" / ids[1] / "job.json"
    truncated.write_bytes(truncated.read_bytes()[:40])
    record = json.loads(wrong.read_text())
    record["progress"] = 7  # parses, but is not a valid status
    wrong.write_text(json.dumps(record))

    app = create_app(Config(), TOKEN, run_fn=staged_job, jobs_dir=tmp_path / "jobs")
    with TestClient(app, base_url=BASE) as client:
        response = client.get("/v1/jobs", headers=AUTH)
        assert response.status_code == 200, response.text
        jobs = {job["id"]: job for job in response.json()["jobs"]}
        assert set(jobs) == set(ids)
        for bad in ids[:2]:
            assert jobs[bad]["state"] == "failed" and jobs[bad]["error"]["code"] == "corrupt_job_record"
            assert client.get(f"/v1/jobs/{bad}/artifacts/mesh.glb", headers=AUTH).status_code == 404
        assert jobs[ids[2]]["state"] == "succeeded" and jobs[ids[2]]["artifacts"]
    assert (tmp_path / "jobs" / ids[0] / "job.json.corrupt").read_bytes() == truncated.with_suffix(".json.corrupt").read_bytes()


def test_a_zip_bomb_is_refused_with_nothing_written(client, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("transforms.json", json.dumps({"camera_angle_x": 0.7, "frames": [{"file_path": "./a.png", "transform_matrix": [[1, 0, 0, 0]] * 4}]}))
        with archive.open("a.png", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 20)
            for _ in range(200):  # 200 MiB of zeros: ~200 KiB compressed
                member.write(block)
    data = buffer.getvalue()
    assert len(data) < 1 << 20
    response = upload(client, data, "application/zip")
    assert response.status_code == 400, response.text
    assert "zip bomb" in response.json()["error"]["message"]
    written = sum(p.stat().st_size for p in (tmp_path / "jobs").rglob("*") if p.is_file())
    assert written < 64 * 1024  # ~0 bytes: the bomb was refused from its headers


# -- 5. results checked before they are called results ------------------------------------------


def _dataset(root: Path, alpha: bool, same_pose: bool = False) -> Path:
    from PIL import Image

    from im3d.cameras import orbit_cameras, write_transforms

    cams = orbit_cameras(6, elevation_deg=20.0, radius=3.0, fov_deg=40.0, width=32)
    if same_pose:
        cams = cams[[0] * 6]
    (root / "images").mkdir(parents=True)
    for i in range(6):
        image = Image.new("RGBA" if alpha else "RGB", (32, 32), (200, 100, 50, 255) if alpha else (200, 100, 50))
        image.save(root / "images" / f"{i}.png")
    write_transforms(root / "transforms.json", cams, [f"./images/{i}.png" for i in range(6)])
    return root


@pytest.mark.parametrize("alpha, same_pose, code", [(False, False, "no_alpha"), (True, True, "degenerate_cameras")])
def test_views_that_cannot_make_an_object_fail_with_a_code_that_says_why(tmp_path, alpha, same_pose, code):
    from im3d.pipeline import run_job
    from im3d.request import JobInputs

    views = _dataset(tmp_path / "views", alpha, same_pose)
    if alpha:  # an object in the middle, so that only the cameras are wrong
        from PIL import Image, ImageDraw

        for png in (views / "images").glob("*.png"):
            image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
            ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=(200, 100, 50, 255))
            image.save(png)
    config = load_config("fast", overrides={"recon": {"image_size": 32, "steps": 5}, "pipeline": {"device": "cpu"}})
    with pytest.raises(Im3dError) as error:
        run_job(JobInputs("reconstruct", views=views), tmp_path / "job", config)
    assert error.value.code == code
    assert not (tmp_path / "job" / "mesh.glb").exists()


# -- 6. every error a code and a sentence, no traceback -----------------------------------------


def test_the_cli_answers_bad_files_with_a_code_not_a_traceback(tmp_path, capsys):
    from im3d.cli import main
    from im3d.errors import exit_code

    bad_ply = tmp_path / "bad.ply"
    bad_ply.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 99999999\nproperty float x\nend_header\n\0\0")
    code = main(["mesh", str(bad_ply), "--out", str(tmp_path / "out.glb")])
    err = capsys.readouterr().err
    assert code == exit_code("invalid_splats") != 0 and "error (invalid_splats)" in err and "Traceback" not in err

    views = _dataset(tmp_path / "views", alpha=True)
    (views / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code = main(["reconstruct", str(views), "--out", str(tmp_path / "out"), "--preset", "fast", "--device", "cpu", "--set", "recon.lpips_weight=0"])
    err = capsys.readouterr().err
    assert code == exit_code("invalid_views") != 0 and "error (invalid_views)" in err and "3.png" in err and "Traceback" not in err

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["reconstruct", str(views), "--out", str(blocker), "--set", "recon.lpips_weight=0"])
    err = capsys.readouterr().err
    assert code != 0 and "is a file, not a folder" in err and "Traceback" not in err


def test_a_reused_out_folder_does_not_keep_the_last_runs_results(tmp_path, capsys):
    from im3d.cli import prepare_out_dir

    out = tmp_path / "out"
    out.mkdir()
    for name in ("mesh.glb", "metrics.json", "frames_round1.png", "notes.txt"):
        (out / name).write_text("old")
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the user's own file stays
    assert "replaced the previous results" in capsys.readouterr().err


# -- 7. connections ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost:abc", "127.0.0.1:80:80", "localhost:99999", "user@localhost", "::1"])
def test_the_host_header_is_parsed_strictly(client, host):
    response = client.get("/v1/health", headers={**AUTH, "Host": host})
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden_host"


def test_a_file_replaced_while_it_is_served_is_sent_whole_as_one_version(tmp_path):
    import asyncio

    from im3d.io_utils import atomic_write_bytes
    from im3d.service.app import file_response

    path = tmp_path / "latest.png"
    old = os.urandom(300_000)
    atomic_write_bytes(path, old)
    response = file_response(path, "image/png")
    atomic_write_bytes(path, b"new and shorter")  # the worker replaces the preview mid-request

    async def body() -> bytes:
        return b"".join([chunk async for chunk in response.body_iterator])

    sent = asyncio.run(body())
    assert sent == old and response.headers["content-length"] == str(len(old))


def test_a_connection_that_never_finishes_its_request_head_is_closed(tmp_path, monkeypatch):
    import uvicorn

    import im3d.service.serving as serving

    monkeypatch.setattr(serving, "HEAD_TIMEOUT_S", 0.5)
    app = create_app(Config(), TOKEN, run_fn=staged_job, jobs_dir=tmp_path / "jobs")
    sock = serving.bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", http=serving.head_timeout_protocol()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /v1/health HTTP/1.1\r\nHo")  # ... and never the rest
        started = time.monotonic()
        assert slow.recv(1024) == b""  # the server closed it
        assert time.monotonic() - started < 5
        slow.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:  # a normal request still works
            ok.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
            assert ok.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.slow
def test_sigterm_stops_the_service_within_seconds_even_if_a_job_ignores_cancel(tmp_path):
    import signal

    from test_server_process import Backend

    backend = Backend(tmp_path)
    backend.start("--runner", "service_runners:stubborn_job")
    try:
        job_id = backend.http.post("/v1/jobs", json={"kind": "generate", "prompt": "x"}).json()["id"]
        backend.wait(job_id, states=("running",))
        asked = time.monotonic()
        backend.process.send_signal(signal.SIGTERM)
        backend.process.wait(timeout=30)
        assert time.monotonic() - asked < 10.0
    finally:
        backend.stop()
    from im3d.service.store import JobStore

    (job,) = JobStore(backend.jobs_dir).load_jobs()
    assert job.state in ("running", "interrupted")  # reported interrupted at the next start, never succeeded
