"""The v1 HTTP API in-process (FastAPI TestClient): auth, Host allow-list, validation, uploads, artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient
from service_runners import staged_job, tiny_png
from test_jobs import make_views_zip

from im3d.config import Config
from im3d.server import bind_socket, create_app, load_or_create_token

TOKEN = "test-token-" + "x" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://127.0.0.1:8765"


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(run_fn=staged_job, **server):
        config = Config()
        for key, value in server.items():
            setattr(config.server, key, value)
        app = create_app(config, TOKEN, run_fn=run_fn, jobs_dir=tmp_path / "jobs")
        client = TestClient(app, base_url=BASE)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory):
    """One server for the many read-only auth/Host cases."""
    app = create_app(Config(), TOKEN, run_fn=staged_job, jobs_dir=tmp_path_factory.mktemp("shared") / "jobs")
    with TestClient(app, base_url=BASE) as client:
        yield client


@pytest.fixture
def small_uploads(make_client):
    return make_client(max_upload_mb=1)


def wait_final(client, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


def assert_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert len(body["error"]["message"]) > 10
    return body["error"]["message"]


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/health"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/openapi.json"), ("GET", "/v1/nope"),
     ("POST", "/v1/uploads"), ("GET", "/v1/jobs/20250101-000000-abcdef/artifacts/mesh.glb")],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN])
def test_wrong_or_missing_token_is_401(shared_client, method, path, authorization):
    client = shared_client
    headers = {"Authorization": authorization} if authorization else {}
    response = client.request(method, path, headers=headers, content=b'{"kind": "generate"}')
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "192.168.1.5:8765", "", "[::2]:8765"])
def test_non_loopback_host_is_403(shared_client, host):
    response = shared_client.get("/v1/health", headers={**AUTH, "Host": host})
    assert_error(response, 403, "forbidden_host")


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]:8765", "127.0.0.1"])
def test_loopback_hosts_are_accepted(shared_client, host):
    response = shared_client.get("/v1/health", headers={**AUTH, "Host": host})
    assert response.status_code == 200
    health = response.json()
    assert health["protocol"] == 1 and health["queue_length"] == 0 and health["running_job"] is None


def test_allow_remote_accepts_other_hosts(make_client):
    client = make_client(allow_remote=True)
    assert client.get("/v1/health", headers={**AUTH, "Host": "studio-gpu:8765"}).status_code == 200
    assert_error(client.get("/v1/health", headers={"Host": "studio-gpu:8765"}), 401, "unauthorized")


def test_request_validation_messages(client):
    post = lambda body, **kw: client.post("/v1/jobs", headers={**AUTH, **kw.pop("headers", {})}, content=body, **kw)  # noqa: E731
    message = assert_error(post(b'{"kind": "generate", '), 400, "invalid_json")
    assert "not valid JSON" in message
    message = assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "colour": "red"})), 422, "invalid_request")
    assert "unknown field 'colour'" in message
    message = assert_error(post(json.dumps({"kind": "generate", "prompt": 3})), 422, "invalid_request")
    assert "body.prompt" in message
    message = assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "seed": "5"})), 422, "invalid_request")
    assert "body.seed" in message
    message = assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "seed": -1})), 422, "invalid_request")
    assert "body.seed" in message
    message = assert_error(post(json.dumps({"kind": "sculpt"})), 422, "invalid_request")
    assert "body.kind" in message
    message = assert_error(post(json.dumps({"prompt": "x"})), 422, "invalid_request")
    assert "body.kind: this field is required" in message
    assert_error(post(json.dumps([1, 2])), 422, "invalid_request")
    assert_error(post(b"null"), 422, "invalid_request")
    message = assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "overrides": {"recon": {"stpes": 3}}})), 422, "invalid_config")
    assert "did you mean 'steps'" in message
    assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "image": "../../etc/passwd"})), 422, "invalid_request")
    assert_error(post(json.dumps({"kind": "generate", "prompt": "x", "image": "a" * 32})), 422, "upload_not_found")
    assert_error(post(b'{"kind": "generate"}', headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    assert_error(post(json.dumps({"kind": "generate", "prompt": "x" * (2 << 20)})), 413, "request_too_large")
    chunked = client.post("/v1/jobs", headers=AUTH, content=iter([b'{"kind": "generate", "prompt": "'] + [b"x" * 65536] * 20 + [b'"}']))
    assert_error(chunked, 413, "request_too_large")
    assert client.get("/v1/jobs", headers=AUTH).json() == {"jobs": []}  # nothing was created


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/v1/nope", headers=AUTH), 404, "not_found")
    assert_error(client.get("/docs", headers=AUTH), 404, "not_found")
    assert_error(client.get("/v1/uploads", headers=AUTH), 405, "method_not_allowed")
    assert_error(client.get("/v1/jobs/not-an-id", headers=AUTH), 404, "job_not_found")
    assert_error(client.post("/v1/jobs/20250101-000000-abcdef/cancel", headers=AUTH), 404, "job_not_found")


def test_uploads_are_capped_and_checked(small_uploads, tmp_path):
    client = small_uploads
    png = tiny_png(5)
    ok = client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png", "X-Filename": "ref.png"}, content=png)
    assert ok.status_code == 201, ok.text
    assert ok.json()["sha256"] == hashlib.sha256(png).hexdigest() and ok.json()["size"] == len(png) and ok.json()["kind"] == "image"
    big = b"\x89PNG\r\n\x1a\n" + b"0" * (1 << 20)
    assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png"}, content=big), 413, "upload_too_large")
    # No Content-Length (chunked): the streamed bytes are counted.
    streamed = client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png"}, content=iter([big[:600_000], big[600_000:]]))
    assert_error(streamed, 413, "upload_too_large")
    assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/gif"}, content=b"GIF89a"), 415, "unsupported_media_type")
    assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png"}, content=b"not a png"), 400, "invalid_upload")
    assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/jpeg"}, content=png), 400, "invalid_upload")
    assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png"}, content=b""), 400, "invalid_upload")
    evil = make_views_zip(extra=[("../../escape.txt", b"x")])
    message = assert_error(client.post("/v1/uploads", headers={**AUTH, "Content-Type": "application/zip"}, content=evil), 400, "invalid_upload")
    assert "'..'" in message
    uploads = tmp_path / "jobs" / "_uploads"
    assert [p.name for p in uploads.iterdir()] == [ok.json()["upload_id"]]  # refused uploads leave nothing behind
    assert not list(tmp_path.rglob("escape.txt"))


def test_full_generate_flow_with_previews_and_artifacts(small_uploads):
    client = small_uploads
    image = client.post("/v1/uploads", headers={**AUTH, "Content-Type": "image/png"}, content=tiny_png(9)).json()["upload_id"]
    created = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "steps=3", "image": image, "seed": 11, "preset": "fast"})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    status = wait_final(client, job_id)
    assert status["state"] == "succeeded" and status["request"]["image"] == image and status["request"]["seed"] == 11
    assert status["previews"] == ["fit_0000.png", "fit_0001.png", "fit_0002.png"]
    preview = client.get(f"/v1/jobs/{job_id}/previews/fit_0002.png", headers=AUTH)
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png" and preview.content == tiny_png(2)
    for artifact in status["artifacts"]:
        data = client.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}", headers=AUTH)
        assert data.status_code == 200
        assert len(data.content) == artifact["size"] and hashlib.sha256(data.content).hexdigest() == artifact["sha256"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/mesh.glb", headers=AUTH).headers["content-type"] == "model/gltf-binary"
    listed = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert [s["id"] for s in listed] == [job_id]


def test_artifact_names_cannot_escape(client, tmp_path):
    job_id = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "x"}).json()["id"]
    assert wait_final(client, job_id)["state"] == "succeeded"
    job_dir = tmp_path / "jobs" / job_id
    (job_dir / "secret.txt").symlink_to("/etc/hostname")
    (job_dir / "previews" / "evil.png").symlink_to("/etc/hostname")
    for name in ["..%2Fjob.json", "%2E%2E", "job.json", "manifest.json", "%2Fetc%2Fpasswd", "secret.txt", "partial_fit.bin", "...", "mesh.glb%00"]:
        response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=AUTH)
        assert response.status_code in (400, 404), (name, response.status_code)
        assert response.json()["error"]["code"] in ("artifact_not_found", "not_found")
    for name in ["evil.png", "..%2F..%2Fjob.json", "..png"]:
        assert client.get(f"/v1/jobs/{job_id}/previews/{name}", headers=AUTH).status_code == 404
    # A manifest entry rewritten to point at a symlink or outside the folder is not served.
    manifest = json.loads((job_dir / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = "secret.txt"
    manifest["artifacts"][1]["path"] = "../../../etc/hostname"
    (job_dir / "manifest.json").write_text(json.dumps(manifest))
    names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["artifacts"]}
    assert names == {manifest["artifacts"][2]["name"]}
    for entry in manifest["artifacts"][:2]:
        assert_error(client.get(f"/v1/jobs/{job_id}/artifacts/{entry['name']}", headers=AUTH), 404, "artifact_not_found")


def test_queue_full_and_cancel_over_http(make_client):
    client = make_client(max_queue=1)
    first = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "steps=2000 step_s=0.005 hold=fit"}).json()["id"]
    while client.get(f"/v1/jobs/{first}", headers=AUTH).json()["state"] == "queued":
        time.sleep(0.005)  # max_queue counts waiting jobs, not the running one
    second = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "x"}).json()["id"]
    assert_error(client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "x"}), 503, "queue_full")
    health = client.get("/v1/health", headers=AUTH).json()
    assert health["running_job"] == first and health["queue_length"] == 1
    assert client.post(f"/v1/jobs/{second}/cancel", headers=AUTH).json()["state"] == "cancelled"
    while client.get(f"/v1/jobs/{first}", headers=AUTH).json()["stage"] != "fit":
        time.sleep(0.01)
    client.post(f"/v1/jobs/{first}/cancel", headers=AUTH)
    status = wait_final(client, first, timeout=3)
    assert status["state"] == "cancelled" and status["artifacts"] == []
    assert_error(client.get(f"/v1/jobs/{first}/artifacts/mesh.glb", headers=AUTH), 404, "artifact_not_found")


def test_two_clients_at_once(make_client):
    client = make_client()
    other = TestClient(client.app, base_url=BASE)  # a second connection pool on the same server
    results, errors = {}, []

    def user(name, http):
        try:
            ids = [http.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": f"{name} steps=2"}).json()["id"] for _ in range(3)]
            last_progress = {}
            while True:
                statuses = [http.get(f"/v1/jobs/{i}", headers=AUTH).json() for i in ids]
                for s in statuses:
                    assert s["progress"] >= last_progress.get(s["id"], 0.0), "progress went backwards"
                    last_progress[s["id"]] = s["progress"]
                if all(s["state"] == "succeeded" for s in statuses):
                    break
                assert not any(s["state"] in ("failed", "cancelled", "interrupted") for s in statuses), statuses
                time.sleep(0.01)
            results[name] = statuses
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=user, args=("alice", client)), threading.Thread(target=user, args=("bob", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert set(results) == {"alice", "bob"}
    for name, statuses in results.items():
        assert all(s["request"]["prompt"].startswith(name) for s in statuses)
        assert all(len(s["artifacts"]) == 3 for s in statuses)
    assert len(client.get("/v1/jobs", headers=AUTH).json()["jobs"]) == 6


def test_token_is_never_logged(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client()
    job_id = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "fail=crash"}).json()["id"]
    wait_final(client, job_id)
    client.get("/v1/health", headers={"Authorization": "Bearer nope"})
    assert caplog.records, "expected the job failure to be logged"
    assert TOKEN not in caplog.text


def test_token_file_is_created_user_only_and_reused(tmp_path):
    path = tmp_path / "sub" / "token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and path.read_text().strip() == token
    if os.name == "posix":
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        path.chmod(0o644)
    assert load_or_create_token(path) == token
    if os.name == "posix":
        assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_openapi_document_describes_the_api(client):
    schema = client.get("/v1/openapi.json", headers=AUTH).json()
    assert set(schema["paths"]) == {
        "/v1/health", "/v1/uploads", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/artifacts/{name}", "/v1/jobs/{job_id}/previews/{name}", "/v1/presets",
        "/v1/models", "/v1/models/pull", "/v1/models/pull/cancel",  # im3d.service.models_routes
    }
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    request = schema["components"]["schemas"]["JobRequest"]
    assert request["additionalProperties"] is False
    assert set(schema["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]) == {"image/png", "image/jpeg", "application/zip"}
    assert schema["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP; without it every
    # keep-alive status poll waited ~40 ms for a delayed ACK (found by bench/bench_server.py).
    import socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[0] == "127.0.0.1"
        with pytest.raises(Exception, match="server.port"):
            bind_socket("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
