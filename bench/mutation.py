#!/usr/bin/env python3
"""Mutation check: plant one-line bugs, one at a time, and see whether the tests meant to catch them do.

Each mutation names a file, an exact snippet of it, its replacement (a one-line bug an author could
plausibly write), the user-visible failure it stands for, and the tests that should fail. The
script copies the working tree (tracked files plus untracked, non-ignored ones, so work in progress
is measured too) into a temporary folder, runs the tests there with this checkout's
`backend/.venv` (PYTHONPATH puts the copy's `backend/` first, so `im3d` is imported from the
copy), applies one mutation, runs its tests with a timeout, restores the file, and goes on.

Results: `caught` (a selected test failed), `timeout` (the tests hung or ran past the limit:
counted as caught, listed apart), `survived` (all selected tests passed: a hole in the suite),
`no longer applies` (the snippet is not in the file any more, or not exactly once: the code moved
on; not counted either way). Score = (caught + timeout) / (caught + timeout + survived).

    backend/.venv/bin/python bench/mutation.py                      # every mutation
    backend/.venv/bin/python bench/mutation.py --only cam,loss     # ids starting with these
    backend/.venv/bin/python bench/mutation.py --check             # which snippets still apply
    backend/.venv/bin/python bench/mutation.py --markdown out.md   # also write the table

A baseline run of each selected test set (unmutated) guards against counting a test that fails
anyway as a catch; `--no-baseline` skips it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / "backend" / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@dataclass
class Mutation:
    id: str
    path: str
    original: str
    replacement: str
    tests: list[str]  # pytest arguments: files, node ids, "-k expr"
    bug: str  # what a user would see
    area: str = field(init=False)

    def __post_init__(self) -> None:
        self.area = self.id.split("-", 1)[0]


CAMERAS = "backend/im3d/cameras.py"
TURNTABLE = "im3d_blender/turntable.py"
LOSSES = "backend/im3d/splats/losses.py"
FIT = "backend/im3d/splats/fit.py"
RT = "backend/im3d/splats/raster/torch_ref.py"
RC = "backend/im3d/splats/raster/cpu.py"
GLTF = "backend/im3d/mesh/gltf.py"
DENSITY = "backend/im3d/mesh/density.py"
CLEANUP = "backend/im3d/mesh/cleanup.py"
WORKER = "backend/im3d/service/worker.py"
STORE = "backend/im3d/service/store.py"
UPLOADS = "backend/im3d/service/uploads.py"
AUTH = "backend/im3d/service/auth.py"
CLIENT = "im3d_blender/client.py"
IMPORTER = "im3d_blender/importer.py"
PIPELINE = "backend/im3d/pipeline.py"

T_CAM = "tests/test_cameras.py"
T_HAND = "tests/test_handedness.py"
T_LOSS = "tests/test_losses.py"
T_ROLL = "tests/test_fit_rollback.py"
T_FIT = "tests/test_fit.py"
T_RAST = "tests/test_rasterize.py"
T_MESH = "tests/test_mesh.py"
T_JOBS = "tests/test_jobs.py"
T_CANCEL = "tests/test_cancel_boundaries.py"
T_HASH = "tests/test_artifact_hashes.py"
T_SERVER = "tests/test_server.py"
T_REAL = "tests/test_real_paths.py"
T_REFINE = "tests/test_real_refine.py"
T_ADDON = "tests/test_blender_addon.py"
T_TURN = "tests/test_blender_turntable.py"

MUTATIONS = [
    # -- cameras: the planted mirror, and its relatives
    Mutation("cam-mirror-x", CAMERAS, "c2w[:3, 3] = right, true_up, -forward, eye", "c2w[:3, 3] = -right, true_up, -forward, eye",
             [T_HAND, T_CAM], "generated objects reconstructed left-right mirrored"),
    Mutation("cam-front-from-plus-y", CAMERAS, "math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)])",
             "math.sin(az), math.cos(el) * math.cos(az), math.sin(el)])", [T_CAM, T_HAND], "azimuth 0 looks from behind (+Y)"),
    Mutation("cam-gl-cv-flip", CAMERAS, "GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])", "GL_TO_CV = np.diag([1.0, 1.0, -1.0, 1.0])",
             [T_CAM], "datasets read upside down"),
    Mutation("cam-shift-y-sign", CAMERAS, "cy = 0.5 * height + shift_y * view_size / pixel_aspect",
             "cy = 0.5 * height - shift_y * view_size / pixel_aspect", [T_CAM, "-k", "projection"], "shifted Blender cameras misprojected"),
    Mutation("cam-principal-point", CAMERAS, "K = intrinsics_matrix(focal, focal, 0.5 * width, 0.5 * height)",
             "K = intrinsics_matrix(focal, focal, 0.5 * width - 0.5, 0.5 * height - 0.5)", [T_CAM, T_HAND], "orbit renders off by half a pixel"),
    Mutation("cam-resize-aspect", CAMERAS, "Ks[:, 1, :] *= sy", "Ks[:, 1, :] *= sx", [T_HAND, "-k", "resizing"], "non-square resizes stretch the image"),
    Mutation("cam-c2w-no-flip", CAMERAS, "return torch.linalg.inv(c2w_gl @ flip)", "return torch.linalg.inv(c2w_gl)",
             [T_CAM], "OpenGL cameras used as OpenCV ones: everything behind the camera"),
    Mutation("cam-turntable-clockwise", TURNTABLE, "math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)))",
             "-math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)))", [T_HAND, "-k", "blender"],
             "the add-on's turntable orbits the other way than the backend assumes"),
    Mutation("cam-turntable-roll", TURNTABLE, 'direction.to_track_quat("-Z", "Y")', 'direction.to_track_quat("-Z", "X")',
             [T_HAND, "-k", "blender"], "turntable renders rolled 90 degrees"),
    # -- losses (the planted dropped mask term, and its relatives)
    Mutation("loss-mask-dropped", LOSSES, "if w.mask > 0:", "if w.mask > 1e9:", [T_LOSS], "the mask term silently missing"),
    Mutation("loss-msssim-sign", LOSSES, 'terms["msssim"] = 1.0 - ms_ssim(colors, targets)', 'terms["msssim"] = ms_ssim(colors, targets)',
             [T_LOSS], "the fit maximises dissimilarity"),
    Mutation("loss-lpips-range", LOSSES, "self.lpips_model(x, y, normalize=True)", "self.lpips_model(x, y, normalize=False)",
             [T_LOSS], "LPIPS fed [0,1] images where it wants [-1,1]"),
    Mutation("loss-mask-weight-default", LOSSES, "    mask: float = 1.0", "    mask: float = 0.1", [T_LOSS], "paper weights changed"),
    Mutation("loss-weights-order", FIT, "LossWeights(config.lpips_weight, config.msssim_weight, config.mask_weight,",
             "LossWeights(config.lpips_weight, config.mask_weight, config.msssim_weight,", [T_LOSS], "config weights applied to the wrong terms"),
    Mutation("loss-msssim-scale-weights", LOSSES, "weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]", "weights = [0.2, 0.2, 0.2, 0.2, 0.2]",
             [T_LOSS, T_FIT, "-k", "ms_ssim or msssim"], "MS-SSIM is not the standard one"),
    # -- rasterizers
    Mutation("rast-torch-conic-sign", RT, "+ conics[:, 1] * dx * dy  # [P, M]", "- conics[:, 1] * dx * dy  # [P, M]",
             [T_RAST, "-k", "brute_force and torch"], "rotated splats drawn mirrored"),
    Mutation("rast-torch-inclusive-T", RT, "before = torch.cat([torch.ones_like(transmittance[:, :1]), transmittance[:, :-1]], dim=1)",
             "before = transmittance", [T_RAST, "-k", "brute_force and torch"], "front splats darkened by themselves"),
    Mutation("rast-cpu-background", RC, "pix[d] += T * background[d]", "pix[d] += background[d]",
             [T_RAST, "-k", "brute_force and cpu"], "background added at full strength behind opaque splats"),
    Mutation("rast-cpu-grad-opacity", RC, "v_local[k, 5] += vis * v_alpha", "v_local[k, 5] += v_alpha",
             [T_RAST, "-k", "cpu_gradients"], "wrong opacity gradients: the fit converges to the wrong opacities"),
    Mutation("rast-cpu-early-stop", RC, "if next_T <= TRANSMITTANCE_THRESHOLD:  # done", "if next_T <= 0.0:  # done",
             [T_RAST, "-k", "brute_force and cpu"], "CPU and GPU renders differ in saturated pixels"),
    # -- the fitting loop (the planted rollback bug, and its relatives)
    Mutation("fit-rollback-keeps-lr", FIT, "group[\"lr\"] = means_lr0 * self.lr_factor * 0.01", "group[\"lr\"] = means_lr0 * 0.01",
             [T_ROLL], "a NaN rollback keeps the learning rate that diverged"),
    Mutation("fit-rollback-no-halving", FIT, "self.lr_factor *= 0.5", "self.lr_factor *= 1.0", [T_ROLL, T_FIT, "-k", "nan or rollback"],
             "rollback retries at the same learning rate"),
    Mutation("fit-rollback-forever", FIT, "if self.rollbacks >= 1 or snapshot is None:", "if self.rollbacks >= 5 or snapshot is None:",
             [T_FIT, "-k", "nan"], "a diverging fit never reports fit_diverged"),
    Mutation("fit-no-cancel", FIT, "            check_cancel(cancel)\n", "            pass\n", [T_FIT, "-k", "cancel"],
             "Cancel does nothing during the fit"),
    Mutation("fit-global-rng-unseeded", FIT, "torch.manual_seed((self.seed * 1_000_003 + first) % 2**63)", "pass",
             [T_REAL, "-k", "seed"], "the same seed gives different objects on a long-running backend"),
    Mutation("fit-background-ignored", FIT, "self.targets = (images.to(self.device) * self.masks + self.background * (1 - self.masks)).contiguous()",
             "self.targets = images.to(self.device).contiguous()", [T_FIT], "splats fitted to a black instead of the configured background"),
    # -- mesh and glTF
    Mutation("mesh-gltf-mirror", GLTF, "[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])", "[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])",
             [T_MESH, "-k", "blender"], "meshes land mirrored in Blender"),
    Mutation("mesh-gltf-normals", GLTF, "normals_out = normals @ Z_UP_TO_Y_UP.T", "normals_out = normals", [T_MESH, "-k", "blender or validator"],
             "shading from the wrong side"),
    Mutation("mesh-quat-rotation", DENSITY, "R[:, 0, 1] = 2 * (x * y - w * z)", "R[:, 0, 1] = 2 * (x * y + w * z)", [T_MESH],
             "rotated splats meshed with the wrong shape"),
    Mutation("mesh-floaters-kept", CLEANUP, "keep_component = sizes >= min_fraction * len(faces)", "keep_component = sizes >= 0",
             [T_MESH, "-k", "floaters"], "floaters kept in the mesh"),
    # -- jobs and service (the planted cancel-after-last-stage bug, and its relatives)
    Mutation("jobs-cancel-after-last-stage", WORKER, "            if job.cancel_event.is_set():\n                raise Cancelled()",
             "            if False:\n                raise Cancelled()", [T_CANCEL], "a job cancelled after its last stage reports succeeded"),
    Mutation("jobs-cancel-during-manifest", WORKER, "if job.cancel_event.is_set() and not self._stopping:", "if False:",
             [T_CANCEL], "a cancel during hashing ends succeeded"),
    Mutation("jobs-size-recheck", STORE, 'if path is not None and path.stat().st_size == entry["size"]:', "if path is not None:",
             [T_JOBS, "-k", "tampered"], "a file changed after the job is served"),
    Mutation("jobs-no-hash", STORE, "if path is None or sha256_file(path) != (size, digest):", "if path is None:",
             [T_HASH], "artifacts served after a size check only"),
    Mutation("jobs-manifest-hash", STORE, 'entries.append({"name": name, "path": relative, "size": size, "sha256": digest})',
             'entries.append({"name": name, "path": relative, "size": size, "sha256": digest[::-1]})',
             [T_HASH], "manifests list wrong hashes: every download refused"),
    Mutation("jobs-restart-not-interrupted", WORKER, '                job.state = "interrupted"\n', '                job.state = "succeeded"\n',
             [T_JOBS, "-k", "restart"], "a job killed mid-way reports succeeded after a restart"),
    Mutation("jobs-queue-unbounded", WORKER, "if busy and len(self._queue) >= self.max_queue:", "if False:",
             [T_JOBS, "-k", "queue"], "the queue grows without bound"),
    Mutation("server-host-check", AUTH, "if not self.allow_remote and not host_is_loopback(host):", "if False:",
             [T_SERVER, "-k", "host"], "DNS rebinding: any web page can drive the backend"),
    Mutation("server-token-scheme", AUTH, 'and scheme.lower() == b"bearer"', 'or scheme.lower() == b"bearer"',
             [T_SERVER, "-k", "token"], "any token accepted"),
    Mutation("server-zip-symlink", UPLOADS, "if stat.S_ISLNK(info.external_attr >> 16):", "if False:",
             [T_JOBS, "-k", "unsafe_zip"], "an uploaded zip can plant a symlink"),
    Mutation("server-zip-bomb", UPLOADS, "if total > max_total_bytes:", "if total > 1000 * max_total_bytes:",
             ["tests/test_hardening.py", "-k", "zip_bomb"], "a zip bomb fills the disk"),
    # -- add-on client and importer
    Mutation("client-no-hash", CLIENT, "if digest != artifact.sha256:", "if False:", [T_HASH], "a tampered download is imported"),
    Mutation("client-no-size", CLIENT, "if len(data) != artifact.size:", "if False:", [T_HASH], "a truncated download is imported"),
    Mutation("client-unlisted-names", CLIENT, "        if missing:\n", "        if False:\n", [T_HASH], "an incomplete result is imported"),
    Mutation("importer-provenance-keys", IMPORTER, 'obj[f"im3d_{key}"] = value', "obj[key] = value", [T_REFINE],
             "provenance lost (no im3d_job_id on the object)"),
    Mutation("importer-texture-not-packed", IMPORTER, "node.image.pack()", "pass", [T_REFINE], "the .blend loses its texture with the cache"),
    Mutation("importer-beside-rotation", IMPORTER, "matrix = Matrix.Translation(Vector((1.2 * width * step, 0.0, 0.0))) @ anchor",
             "matrix = Matrix.Translation(Vector((1.2 * width * step, 0.0, 0.0))) @ Matrix.Translation(anchor.translation)",
             [T_REFINE], "the refined copy loses the original's rotation"),
    Mutation("importer-material-name", IMPORTER, 'slot.material.name = name if index == 0 else f"{name}.{index}"', "pass",
             [T_REFINE], "materials keep glTF names"),
    # -- pipeline
    Mutation("pipeline-refine-back-reference", PIPELINE, "front = int(torch.argmin(torch.atan2(centers[:, 0], -centers[:, 1]).abs()))",
             "front = int(torch.argmax(torch.atan2(centers[:, 0], -centers[:, 1]).abs()))", ["tests/test_refine_reference.py"],
             "refine conditions the diffusion on the back view"),
]


# ---------------------------------------------------------------------------------------------


def working_tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    return sorted({p for p in out.stdout.decode().split("\0") if p})


def make_copy(dest: Path) -> None:
    for relative in working_tree_files():
        source = ROOT / relative
        if not source.is_file() or source.is_symlink():
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    node_modules = ROOT / "tools" / "npm" / "node_modules"  # ignored; the glTF validator tests need it
    if node_modules.is_dir():
        (dest / "tools" / "npm").mkdir(parents=True, exist_ok=True)
        (dest / "tools" / "npm" / "node_modules").symlink_to(node_modules)


def test_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "backend"), str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant's .pyc must never outlive the mutant
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, the first failing test or the tail of the output)."""
    cmd = [str(VENV_PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--timeout={int(timeout)}", *tests]
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    seconds = time.monotonic() - started
    text = result.stdout + result.stderr
    if result.returncode == 0:
        return "passed", seconds, ""
    if result.returncode == 5:
        return "no tests", seconds, "no test matched the selection"
    if "Timeout" in text and "+++++++" in text:
        return "timeout", seconds, ""
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "failed", seconds, (failed[0] if failed else text.strip().splitlines()[-1] if text.strip() else f"exit {result.returncode}")[:160]


def apply(copy: Path, mutation: Mutation) -> str | None:
    """Apply `mutation` in the copy; returns the original text, or None when it no longer applies."""
    path = copy / mutation.path
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if text.count(mutation.original) != 1:
        return None
    stat = path.stat()
    path.write_text(text.replace(mutation.original, mutation.replacement), encoding="utf-8")
    # A different mtime than the original's, so no cache (numba, .pyc) keyed on it is reused.
    os.utime(path, (stat.st_atime, stat.st_mtime + 17))
    return text


def restore(copy: Path, mutation: Mutation, text: str) -> None:
    path = copy / mutation.path
    path.write_text(text, encoding="utf-8")
    now = time.time()
    os.utime(path, (now, now))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| mutation | file | bug it stands for | result | s | caught by / note |", "| --- | --- | --- | --- | ---: | --- |"]
    for row in rows:
        m = row["mutation"]
        lines.append(f"| `{m.id}` | `{m.path}` | {m.bug} | {row['result']} | {row['seconds']:.0f} | {row['detail'].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated id prefixes (e.g. cam,loss,jobs-no-hash)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    parser.add_argument("--check", action="store_true", help="only report which mutations still apply")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    parser.add_argument("--markdown", help="write the results table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)

    prefixes = [p for p in args.only.split(",") if p]
    chosen = [m for m in MUTATIONS if not prefixes or any(m.id.startswith(p) for p in prefixes)]
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids)), "duplicate mutation ids"
    print(f"{len(chosen)} of {len(MUTATIONS)} mutations; machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="im3d-mutation-"))
    copy = workdir / "tree"
    rows: list[dict] = []
    try:
        make_copy(copy)
        if args.check:
            for m in chosen:
                text = (copy / m.path).read_text(encoding="utf-8") if (copy / m.path).is_file() else ""
                print(f"{m.id:34s} {'applies' if text.count(m.original) == 1 else 'NO LONGER APPLIES'} ({text.count(m.original)} matches)")
            return 0
        baseline: dict[tuple, tuple[str, str]] = {}
        for m in chosen:
            row = {"mutation": m, "result": "", "seconds": 0.0, "detail": ""}
            rows.append(row)
            key = tuple(m.tests)
            text = (copy / m.path).read_text(encoding="utf-8") if (copy / m.path).is_file() else ""
            if text.count(m.original) != 1:
                row["result"], row["detail"] = "no longer applies", f"snippet found {text.count(m.original)} times"
            else:
                if not args.no_baseline and key not in baseline:
                    outcome, seconds, detail = run_tests(copy, m.tests, args.timeout)
                    baseline[key] = (outcome, detail)
                    print(f"  baseline {' '.join(m.tests)}: {outcome} ({seconds:.0f} s) {detail}", flush=True)
                if key in baseline and baseline[key][0] != "passed":
                    row["result"], row["detail"] = "baseline fails", baseline[key][1]
                else:
                    original = apply(copy, m)
                    try:
                        outcome, row["seconds"], detail = run_tests(copy, m.tests, args.timeout)
                    finally:
                        restore(copy, m, original)
                    row["result"] = {"failed": "caught", "passed": "survived", "timeout": "timeout"}.get(outcome, outcome)
                    row["detail"] = detail
            print(f"{m.id:34s} {row['result']:18s} {row['seconds']:6.0f} s  {row['detail']}", flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    caught = sum(r["result"] in ("caught", "timeout") for r in rows)
    survived = [r for r in rows if r["result"] == "survived"]
    stale = [r for r in rows if r["result"] not in ("caught", "timeout", "survived")]
    scored = caught + len(survived)
    print()
    print(markdown_table(rows))
    print()
    score = 100.0 * caught / scored if scored else 0.0
    print(f"score: {caught}/{scored} caught ({score:.0f}%); {len(stale)} not scored (no longer applies / baseline fails / no tests)")
    for r in survived:
        print(f"  survived: {r['mutation'].id} ({r['mutation'].path}): {r['mutation'].bug}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + f"\n\nScore: {caught}/{scored} ({score:.0f}%).\n", encoding="utf-8")
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
