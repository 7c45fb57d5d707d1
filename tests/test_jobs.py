"""Job store, FIFO queue, cancellation, crash recovery and safe uploads (im3d.service.store / worker / uploads), without HTTP."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from service_runners import STAGES, staged_job, tiny_png

from im3d.config import Config
from im3d.errors import Cancelled
from im3d.errors import Im3dError as ServiceError
from im3d.service.store import JobStore
from im3d.service.uploads import check_views_dataset, extract_zip_safely, find_views_root
from im3d.service.worker import JobManager


@pytest.fixture
def make_manager(tmp_path):
    managers = []

    def make(run_fn=staged_job, max_queue=16, root=None):
        config = Config()
        config.server.max_queue = max_queue
        manager = JobManager(JobStore(root or tmp_path / "jobs"), run_fn=run_fn, config=config)
        manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.shutdown(timeout=5)


def wait_final(manager, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = manager.status(job_id)
        if status["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {manager.status(job_id)['state']} after {timeout} s")


def generate(prompt="a cube", **extra):
    return {"kind": "generate", "prompt": prompt, **extra}


def test_job_succeeds_with_manifest_written_last(make_manager):
    manager = make_manager()
    job_id = manager.submit(generate("steps=2", seed=7))
    status = wait_final(manager, job_id)
    assert status["state"] == "succeeded", status
    assert status["progress"] == 1.0 and status["error"] is None
    assert status["request"]["seed"] == 7
    job_dir = manager.store.root / job_id
    manifest = json.loads((job_dir / "manifest.json").read_text())
    names = {e["name"] for e in manifest["artifacts"]}
    assert names == {"mesh.glb", "preview.png", "metrics.json"}
    assert {a["name"] for a in status["artifacts"]} == names
    import hashlib

    for entry in manifest["artifacts"]:
        data = (job_dir / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    # manifest.json is the last file written: every artifact is older or equal.
    manifest_time = (job_dir / "manifest.json").stat().st_mtime_ns
    assert all((job_dir / e["path"]).stat().st_mtime_ns <= manifest_time for e in manifest["artifacts"])
    record = json.loads((job_dir / "job.json").read_text())
    assert record["state"] == "succeeded" and record["config"]["recon"]["steps"] == 1200
    assert [s["stage"] for s in record["stages"]] == list(STAGES)
    assert all(s["finished"] is not None for s in record["stages"])
    assert status["previews"] == ["fit_0000.png", "fit_0001.png"]


def test_seed_is_chosen_and_recorded_and_presets_apply(make_manager):
    manager = make_manager()
    job_id = manager.submit(generate(preset="fast", overrides={"recon": {"steps": 33}}))
    status = wait_final(manager, job_id)
    assert isinstance(status["request"]["seed"], int) and 0 <= status["request"]["seed"] < 2**32
    config = json.loads((manager.store.root / job_id / "job.json").read_text())["config"]
    assert config["recon"]["steps"] == 33  # override beats preset
    assert config["recon"]["image_size"] == 128  # the fast preset


def test_jobs_run_one_at_a_time_in_submission_order(make_manager):
    order, active, overlap = [], [], []

    def run(request, workdir, config, progress, cancel):
        active.append(1)
        overlap.append(len(active))
        order.append(request.prompt)
        time.sleep(0.02)
        active.pop()
        (Path(workdir) / "out.txt").write_text(request.prompt)
        return {"out.txt": Path(workdir) / "out.txt"}

    manager = make_manager(run_fn=run)
    ids = [manager.submit(generate(f"job{i}")) for i in range(5)]
    for job_id in ids:
        assert wait_final(manager, job_id)["state"] == "succeeded"
    assert order == [f"job{i}" for i in range(5)]
    assert max(overlap) == 1
    listed = [s["id"] for s in manager.list_statuses()]
    assert listed == ids[::-1]  # newest first


def test_queue_is_bounded(make_manager):
    release = threading.Event()

    def blocking(request, workdir, config, progress, cancel):
        while not release.is_set():
            if cancel():
                raise Cancelled()
            time.sleep(0.005)
        return {}

    manager = make_manager(run_fn=blocking, max_queue=2)
    first = manager.submit(generate())
    while manager.running_job != first:
        time.sleep(0.005)
    manager.submit(generate())
    manager.submit(generate())
    with pytest.raises(ServiceError) as info:
        manager.submit(generate())
    assert info.value.code == "queue_full"
    release.set()


def test_cancel_queued_job_is_immediate(make_manager):
    release = threading.Event()

    def blocking(request, workdir, config, progress, cancel):
        release.wait(5)
        return {}

    manager = make_manager(run_fn=blocking)
    running = manager.submit(generate())
    queued = manager.submit(generate())
    status = manager.cancel(queued)
    assert status["state"] == "cancelled"
    release.set()
    assert wait_final(manager, running)["state"] == "succeeded"
    assert manager.status(queued)["state"] == "cancelled"
    assert manager.cancel(queued)["state"] == "cancelled"  # idempotent on final jobs


@pytest.mark.parametrize("stage", STAGES)
def test_cancel_during_each_stage_ends_within_one_second(make_manager, stage):
    entered = {s: threading.Event() for s in STAGES}

    def run(request, workdir, config, progress, cancel):
        return staged_job(request, workdir, config, progress, cancel, stage_entered=lambda s: entered[s].set())

    manager = make_manager(run_fn=run)
    job_id = manager.submit(generate(f"steps=1000 step_s=0.005 hold={stage}"))
    assert entered[stage].wait(10), f"stage {stage} never started"
    asked = time.monotonic()
    manager.cancel(job_id)
    status = wait_final(manager, job_id, timeout=5)
    assert time.monotonic() - asked < 1.0
    assert status["state"] == "cancelled" and status["stage"] == stage
    assert status["artifacts"] == []
    assert not (manager.store.root / job_id / "manifest.json").exists()


def test_failures_carry_codes_and_keep_the_queue_going(make_manager):
    manager = make_manager()
    failed_pipeline = manager.submit(generate("fail=pipeline"))
    failed_storage = manager.submit(generate("fail=storage"))
    crashed = manager.submit(generate("fail=crash"))
    ok = manager.submit(generate())
    status = wait_final(manager, failed_pipeline)
    assert status["state"] == "failed" and status["error"]["code"] == "no_object_found"
    status = wait_final(manager, failed_storage)
    assert status["error"]["code"] == "storage_error"
    assert "No space left on device" in status["error"]["message"] and "mesh.glb" in status["error"]["message"]
    status = wait_final(manager, crashed)
    assert status["error"]["code"] == "internal_error" and "ZeroDivisionError" in status["error"]["message"]
    assert "simulated bug" in (manager.store.root / crashed / "error.log").read_text()
    assert wait_final(manager, ok)["state"] == "succeeded"
    for job_id in (failed_pipeline, failed_storage, crashed):
        assert manager.status(job_id)["artifacts"] == []
        assert not (manager.store.root / job_id / "manifest.json").exists()


def test_artifacts_escaping_the_job_folder_fail_the_job(make_manager, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")

    def escaping(request, workdir, config, progress, cancel):
        link = Path(workdir) / "link.txt"
        link.symlink_to(outside)
        return {"outside.txt": outside} if request.prompt == "outside" else {"link.txt": link}

    manager = make_manager(run_fn=escaping)
    for prompt in ("outside", "symlink"):
        status = wait_final(manager, manager.submit(generate(prompt)))
        assert status["state"] == "failed" and status["error"]["code"] == "internal_error", status
        assert status["artifacts"] == []


def test_tampered_artifacts_are_not_served(make_manager):
    manager = make_manager()
    job_id = manager.submit(generate())
    assert wait_final(manager, job_id)["state"] == "succeeded"
    job_dir = manager.store.root / job_id
    (job_dir / "metrics.json").write_text("changed size")
    (job_dir / "preview.png").unlink()
    (job_dir / "preview.png").symlink_to(job_dir / "mesh.glb")
    names = {a["name"] for a in manager.status(job_id)["artifacts"]}
    assert names == {"mesh.glb"}
    assert manager.store.artifact_path(job_id, "preview.png") is None
    assert manager.store.artifact_path(job_id, "../job.json") is None


def test_restart_marks_running_and_queued_jobs_interrupted(make_manager, tmp_path):
    root = tmp_path / "jobs"
    started = threading.Event()

    def hang(request, workdir, config, progress, cancel):
        (Path(workdir) / "partial.bin").write_bytes(b"half")
        progress("fit", 0.3, "fitting", None)
        started.set()
        time.sleep(30)  # never sees cancel: stands in for a process killed mid-step
        return {}

    first = JobManager(JobStore(root), run_fn=hang)
    first.start()
    running = first.submit(generate())
    queued = first.submit(generate())
    assert started.wait(5)
    time.sleep(0.05)
    # Simulate a crash: the process vanishes without shutdown(); a stray manifest is also left behind.
    (root / running / "manifest.json").write_text(json.dumps({"artifacts": [{"name": "partial.bin", "path": "partial.bin", "size": 4, "sha256": "0" * 64}]}))
    first._closed = True  # the dead process writes nothing more

    second = make_manager(root=root)
    for job_id in (running, queued):
        status = second.status(job_id)
        assert status["state"] == "interrupted" and status["error"]["code"] == "interrupted"
        assert status["artifacts"] == []
    assert not (root / running / "manifest.json").exists()
    assert json.loads((root / running / "job.json").read_text())["state"] == "interrupted"
    fresh = second.submit(generate())
    assert wait_final(second, fresh)["state"] == "succeeded"


def test_shutdown_interrupts_running_and_queued(tmp_path):
    manager = JobManager(JobStore(tmp_path / "jobs"), run_fn=staged_job)
    manager.start()
    running = manager.submit(generate("steps=500 step_s=0.01"))
    queued = manager.submit(generate())
    while manager.status(running)["state"] != "running":
        time.sleep(0.005)
    manager.shutdown(timeout=5)
    for job_id in (running, queued):
        record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
        assert record["state"] == "interrupted", record
    with pytest.raises(ServiceError) as info:
        manager.submit(generate())
    assert info.value.code == "shutting_down"


def test_request_rules(make_manager, tmp_path):
    manager = make_manager()
    cases = [
        (generate(""), "invalid_request", "prompt or an image"),
        ({"kind": "reconstruct"}, "invalid_request", "needs views"),
        ({"kind": "generate", "prompt": "x", "overrides": {"server": {"port": 1}}}, "invalid_config", "server section"),
        ({"kind": "generate", "prompt": "x", "overrides": {"recon": {"steps": -1}}}, "invalid_config", "recon.steps"),
        ({"kind": "generate", "prompt": "x", "image": "0" * 32}, "upload_not_found", "POST /v1/uploads"),
    ]
    for request, code, text in cases:
        with pytest.raises(ServiceError) as info:
            manager.submit(request)
        assert info.value.code == code and text in info.value.message, info.value.message
    # refine needs a prompt unless diffusion is off
    upload_id, staging = manager.store.new_upload_dir()
    (staging / "data").write_bytes(make_views_zip())
    meta = manager.store.finish_upload(upload_id, staging, "application/zip", "views", 1, "x", "v.zip", 1 << 20)
    with pytest.raises(ServiceError) as info:
        manager.submit({"kind": "refine", "views": upload_id})
    assert info.value.code == "invalid_request" and "prompt" in info.value.message
    with pytest.raises(ServiceError) as info:
        manager.submit({"kind": "generate", "image": upload_id})
    assert info.value.code == "wrong_upload_kind"
    job_id = manager.submit({"kind": "refine", "views": upload_id, "overrides": {"diffusion": {"enabled": False}}})
    assert wait_final(manager, job_id)["state"] == "succeeded"
    views = manager.store.root / job_id / "inputs" / "views"
    assert (views / "transforms.json").is_file() and (views / "images" / "r_0.png").is_file()
    assert meta["frames"] == 2


# -- zip safety ---------------------------------------------------------------------------------


def make_views_zip(prefix="", extra=None, frames=("images/r_0", "images/r_1.png")) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        transforms = {"camera_angle_x": 0.69, "frames": [{"file_path": f"./{p}", "transform_matrix": [[1, 0, 0, 0]] * 4} for p in frames]}
        archive.writestr(prefix + "transforms.json", json.dumps(transforms))
        archive.writestr(prefix + "images/r_0.png", tiny_png(1))
        archive.writestr(prefix + "images/r_1.png", tiny_png(2))
        for info, data in extra or []:
            archive.writestr(info, data)
    return buffer.getvalue()


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info


@pytest.mark.parametrize(
    "extra, message",
    [
        ([("../evil.txt", b"x")], "'..'"),
        ([("a/../../evil.txt", b"x")], "'..'"),
        ([("/etc/evil.txt", b"x")], "absolute"),
        ([("C:/evil.txt", b"x")], "absolute"),
        ([("a\\..\\evil.txt", b"x")], "absolute"),
        ([(symlink_member("images/link.png", "/etc/passwd"), "/etc/passwd")], "symlink"),
    ],
)
def test_unsafe_zip_members_are_refused(tmp_path, extra, message):
    path = tmp_path / "v.zip"
    path.write_bytes(make_views_zip(extra=extra))
    with pytest.raises(ServiceError) as info:
        extract_zip_safely(path, tmp_path / "out", 1 << 20)
    assert info.value.code == "invalid_upload" and message in info.value.message
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_zip_too_large_unpacked_is_refused_from_its_declared_sizes(tmp_path):
    import os

    path = tmp_path / "big.zip"
    path.write_bytes(make_views_zip(extra=[("noise.bin", os.urandom(3 << 20))]))  # incompressible: no ratio alarm
    with pytest.raises(ServiceError) as info:
        extract_zip_safely(path, tmp_path / "out", 1 << 20)
    assert "declares 3 MiB unpacked, more than the 1 MiB allowed" in info.value.message
    assert not (tmp_path / "out").exists()  # refused before a byte was written


def test_views_root_and_frame_files_are_checked(tmp_path):
    path = tmp_path / "v.zip"
    path.write_bytes(make_views_zip(prefix="scene/", extra=[("__MACOSX/._x", b"junk")]))
    extract_zip_safely(path, tmp_path / "a", 1 << 20)
    root = find_views_root(tmp_path / "a")
    assert root == tmp_path / "a" / "scene" and check_views_dataset(root) == 2
    path.write_bytes(make_views_zip(frames=("images/r_0", "images/missing")))
    extract_zip_safely(path, tmp_path / "b", 1 << 20)
    with pytest.raises(ServiceError) as info:
        check_views_dataset(find_views_root(tmp_path / "b"))
    assert "images/missing" in info.value.message
    (tmp_path / "c").mkdir()
    with pytest.raises(ServiceError) as info:
        find_views_root(tmp_path / "c")
    assert "transforms.json" in info.value.message


def test_unwritable_jobs_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    manager = JobManager(JobStore(blocker / "jobs"))
    with pytest.raises(ServiceError) as info:
        manager.start()
    assert info.value.code == "storage_error" and str(blocker) in info.value.message
    assert blocker.read_text() == "not a folder"


def test_views_root_accepts_the_nerf_synthetic_name(tmp_path):
    from im3d.errors import Im3dError as ServiceError
    from im3d.service.uploads import find_views_root

    nested = tmp_path / "upload" / "lego"
    nested.mkdir(parents=True)
    (nested / "transforms_train.json").write_text("{}")
    assert find_views_root(tmp_path / "upload") == nested
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServiceError, match="no transforms.json"):
        find_views_root(tmp_path / "empty")
