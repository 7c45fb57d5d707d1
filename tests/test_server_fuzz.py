"""Schema fuzzing of the API from its own OpenAPI document (schemathesis), plus raw-body fuzzing.

The default suite runs a few hundred cases; `--run-slow` runs thousands. Every response must be a
documented status with a body matching its schema, never a 5xx.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im3d.config import Config
from im3d.server import create_app

TOKEN = "fuzz-token-" + "y" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://127.0.0.1:8765"
DEFAULT_EXAMPLES = 25  # per operation and mode: 7 x 2 x 25 = 350 cases
SLOW_EXAMPLES = 400  # per operation and mode: 5,600 cases
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def quick_job(request, workdir, config, progress, cancel):
    """Finishes at once so fuzzed job submissions never fill the queue."""
    progress("fit", 0.5, "half", None)
    out = Path(workdir) / "mesh.glb"
    out.write_bytes(b"glTF" + json.dumps(request, default=str).encode())
    return {"mesh.glb": out}


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    config = Config()
    config.server.max_queue = 100_000
    config.server.max_upload_mb = 1
    app = create_app(config, TOKEN, run_fn=quick_job, jobs_dir=tmp_path_factory.mktemp("fuzz") / "jobs")
    with TestClient(app, base_url=BASE) as client:  # runs the lifespan: the job worker is live
        client.fuzz_app = without_lifespan(app)
        # One finished job, so that artifact/preview/cancel routes also meet a real id.
        job_id = client.post("/v1/jobs", headers=AUTH, json={"kind": "generate", "prompt": "seed job"}).json()["id"]
        while client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] != "succeeded":
            pass
        yield client


# The document the server serves (checked against the live route in test_server.py); operations
# are enumerated at collection time so each gets its own test id.
SCHEMA = schemathesis.openapi.from_dict(create_app(Config(), TOKEN, jobs_dir="/nonexistent").openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


CASES_RUN = []


def without_lifespan(app):
    """The app for schemathesis' per-call ASGI clients: the module's TestClient owns the lifespan,
    so the job worker is started once and never shut down between cases."""

    async def wrapper(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapper


def check_case(client, case):
    CASES_RUN.append(case.operation.label)
    response = case.call(base_url=BASE, headers={**(case.headers or {}), **AUTH}, app=client.fuzz_app)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    content_type = response.headers.get("content-type", [""])
    if response.status_code >= 400:
        assert content_type[0].startswith("application/json"), content_type
        body = json.loads(response.content)
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body
    case.validate_response(response, checks=[
        schemathesis.checks.not_a_server_error,
        schemathesis.specs.openapi.checks.status_code_conformance,
        schemathesis.specs.openapi.checks.content_type_conformance,
        schemathesis.specs.openapi.checks.response_schema_conformance,
        schemathesis.specs.openapi.checks.negative_data_rejection,
    ])


def fuzz(client, operation, mode, examples):
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        check_case(client, case)

    run()


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_api_from_its_openapi_document(fuzz_client, operation, mode):
    fuzz(fuzz_client, operation, mode, DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_api_from_its_openapi_document_thousands(fuzz_client, operation, mode):
    fuzz(fuzz_client, operation, mode, SLOW_EXAMPLES)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["kind", "prompt", "negative_prompt", "image", "views", "seed", "preset", "overrides", "Kind", "extra", ""])


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(body=st.binary(max_size=300) | st.dictionaries(FIELDS, JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()))
def test_raw_job_bodies_never_crash(fuzz_client, body):
    response = fuzz_client.post("/v1/jobs", headers=AUTH, content=body)
    assert response.status_code in (201, 400, 413, 415, 422), (body, response.status_code, response.text)
    if response.status_code != 201:
        assert response.json()["error"]["code"] in ("invalid_json", "invalid_request", "invalid_config", "upload_not_found", "wrong_upload_kind")


@settings(max_examples=40, **FUZZ_SETTINGS)
@given(
    content_type=st.sampled_from(["image/png", "image/jpeg", "application/zip", "text/plain", "", "image/png; charset=x"]),
    body=st.binary(max_size=200) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"PK\x03\x04garbage", b"\xff\xd8\xff\xe0"]),
)
def test_raw_uploads_never_crash(fuzz_client, content_type, body):
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    response = fuzz_client.post("/v1/uploads", headers=headers, content=body)
    assert response.status_code in (201, 400, 413, 415), (content_type, body, response.text)


def test_fuzzing_ran_hundreds_of_cases():
    """Guards against a generator that silently stops producing cases (runs after the fuzz tests)."""
    if not CASES_RUN:
        pytest.skip("the schema fuzz tests did not run in this session")
    print(f"schema fuzzing ran {len(CASES_RUN)} cases")
    assert len(CASES_RUN) >= 200, len(CASES_RUN)
    assert len(set(CASES_RUN)) == len(OPERATIONS)
