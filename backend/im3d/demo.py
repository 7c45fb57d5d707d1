"""`im3d demo`: the main job on a fresh machine, with no model weights.

Starts the backend service on 127.0.0.1 (a real `python -m im3d.server` process), uploads the
multi-view dataset of Suzanne shipped with the package (rendered by bench/render_datasets.py),
runs it as a `refine` job with diffusion off — reconstruction, meshing and texturing — with a
progress bar, downloads the verified artifacts and says where they are.

LPIPS is switched off because its VGG backbone is model weights too (ImageNet-trained), which a
fresh machine does not have; the fit uses MS-SSIM + L1 + mask instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

DATASET = Path(__file__).resolve().parent / "data" / "suzanne"
DEMO_OVERRIDES = {
    "diffusion": {"enabled": False},
    "recon": {"lpips_weight": 0.0, "l1_weight": 1.0, "init": "visual_hull"},
}


class DemoClient:
    """Just enough of the v1 protocol for the demo (the add-on has the full client)."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")
            raise RuntimeError(f"{method} {path} -> HTTP {error.code}: {detail}") from None

    def json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        return json.loads(self.request(method, path, body))


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def start_backend(jobs_dir: Path, token_file: Path, preset: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-u", "-m", "im3d.server", "--jobs-dir", str(jobs_dir), "--port", "0", "--token-file", str(token_file), "--preset", preset]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("IM3D-READY "):
            return process, line.split(" ", 1)[1].strip()
    process.kill()
    raise RuntimeError("the backend did not become ready within 120 s; run `python -m im3d.server` to see why")


def run_demo(out_dir: str | Path, preset: str = "fast", keep_server: bool = False, dataset: Path = DATASET) -> int:
    from tqdm import tqdm

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="im3d-demo-"))
    process, url = start_backend(work / "jobs", work / "token", preset)
    try:
        client = DemoClient(url, (work / "token").read_text().strip())
        print(f"backend at {url}; uploading {dataset.name} views")
        upload = json.loads(client.request("POST", "/v1/uploads", zip_folder(dataset), "application/zip"))
        job = client.json("POST", "/v1/jobs", {"kind": "refine", "views": upload["upload_id"], "preset": preset, "overrides": DEMO_OVERRIDES})
        bar = tqdm(total=1000, bar_format="{l_bar}{bar}| {elapsed}<{remaining}", file=sys.stderr)
        while True:
            status = client.json("GET", f"/v1/jobs/{job['id']}")
            bar.set_description_str((status.get("message") or status["state"])[:70])
            bar.n = int(1000 * (status.get("progress") or 0.0))
            bar.refresh()
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        bar.close()
        if status["state"] != "succeeded":
            error = status.get("error") or {}
            print(f"demo job {status['state']}: {error.get('code')}: {error.get('message')}", file=sys.stderr)
            return 1
        for artifact in status["artifacts"]:
            data = client.request("GET", f"/v1/jobs/{job['id']}/artifacts/{artifact['name']}")
            if hashlib.sha256(data).hexdigest() != artifact["sha256"] or len(data) != artifact["size"]:
                print(f"artifact {artifact['name']} failed verification", file=sys.stderr)
                return 1
            (out_dir / artifact["name"]).write_bytes(data)
        metrics = json.loads((out_dir / "metrics.json").read_text())
        print(f"\nIM-3D demo (refine job {job['id']}, diffusion off) finished. Results in {out_dir}:")
        for name in ("mesh.glb", "preview.png", "metrics.json", "splats.ply"):
            print(f"  {name:13s} {out_dir / name}")
        held = metrics.get("heldout", {})
        mesh = metrics.get("mesh", {})
        print(
            f"held-out views: PSNR {held.get('psnr', float('nan')):.2f} dB, SSIM {held.get('ssim', float('nan')):.3f}, "
            f"mask IoU {held.get('mask_iou', float('nan')):.3f}; mesh {mesh.get('faces')} faces, watertight {mesh.get('watertight')}; "
            f"fit {metrics['timings'].get('fit_s', 0):.1f} s, mesh {metrics['timings'].get('mesh_s', 0):.1f} s"
        )
        return 0
    finally:
        if not keep_server:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
