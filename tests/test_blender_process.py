"""The add-on's backend process manager (bpy-free) recognises an IM-3D backend by its protocol.

Each kind of answer on the port gets its own state and message: nothing there, our backend,
an IM-3D backend with another token, an HTTP program, a program that accepts and never answers.
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from im3d_blender.backend_process import BackendProcess, probe  # noqa: E402
from im3d_blender.client import BackendError  # noqa: E402


def serve(handler_body):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            status, payload = handler_body(self)
            body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_kind_of_answer_on_the_port_is_told_apart(servers, tmp_path):
    token = "t" * 32
    ours = serve(lambda h: (200, {"version": "0.1.0", "protocol": 1}) if h.headers["Authorization"] == f"Bearer {token}" else (401, {}))
    other = serve(lambda h: (401, {"error": {"code": "unauthorized", "message": "the bearer token is wrong"}}))
    foreign = serve(lambda h: (404, b"<!DOCTYPE HTML><html>not found</html>"))
    json_but_not_ours = serve(lambda h: (200, {"status": "ok"}))
    servers += [ours, other, foreign, json_but_not_ours]
    url = lambda s: f"http://127.0.0.1:{s.server_address[1]}"  # noqa: E731
    assert probe(url(ours), token) == "im3d"
    assert probe(url(other), token) == "im3d_other_token"
    assert probe(url(foreign), token) == "foreign"
    assert probe(url(json_but_not_ours), token) == "foreign"
    assert probe(f"http://127.0.0.1:{free_port()}", token) == "free"
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        assert probe(f"http://127.0.0.1:{silent.getsockname()[1]}", token, timeout=0.5) == "foreign"
    finally:
        silent.close()


def test_ensure_ready_names_the_port_and_never_reports_running(servers, tmp_path):
    foreign = serve(lambda h: (404, b"<!DOCTYPE HTML>"))
    other = serve(lambda h: (401, {"error": {"code": "unauthorized", "message": "wrong token"}}))
    servers += [foreign, other]
    for server, expected in ((foreign, "is used by another program; pick another port in Preferences"), (other, "another IM-3D backend")):
        process = BackendProcess(sys.executable, tmp_path / "data", port=server.server_address[1])
        with pytest.raises(BackendError) as caught:
            process.ensure_ready(5.0)
        assert caught.value.code == "port_in_use" and expected in caught.value.message
        assert process.process is None and not process.status_text().startswith("running")
        assert expected in process.status_text()


def test_a_backend_already_on_the_port_is_adopted_not_started_twice(servers, tmp_path):
    process = BackendProcess(sys.executable, tmp_path / "data", port=0)
    token = process.token()
    ours = serve(lambda h: (200, {"version": "0.1.0", "protocol": 1}) if h.headers["Authorization"] == f"Bearer {token}" else (401, {}))
    servers.append(ours)
    process.port = ours.server_address[1]
    health = process.ensure_ready(5.0)
    assert health["protocol"] == 1 and process.process is None and process.adopted
    assert process.status_text().startswith("running (an IM-3D backend already on port")


def test_an_unset_up_environment_says_press_set_up(tmp_path):
    half_made = tmp_path / "env"
    (half_made / "bin").mkdir(parents=True)
    (half_made / "bin" / "python").write_text("")  # a python, but no finished set-up marker
    process = BackendProcess(half_made / "bin" / "python", tmp_path / "data", port=free_port(), env_dir=half_made)
    with pytest.raises(BackendError, match="press Set up Backend") as caught:
        process.ensure_ready(5.0)
    assert caught.value.code == "backend_not_set_up"


def test_without_start_automatically_a_free_port_says_press_start(tmp_path):
    process = BackendProcess(sys.executable, tmp_path / "data", port=free_port())
    with pytest.raises(BackendError, match="press Start in the add-on's preferences") as caught:
        process.ensure_ready(5.0, start=False)
    assert caught.value.code == "backend_not_running" and process.process is None
