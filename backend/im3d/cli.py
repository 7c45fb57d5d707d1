"""`im3d serve | generate | refine | reconstruct | mesh | demo | models` — the backend on the command line.

Every job command takes the same config options (--preset, --config FILE, --set a.b=value,
--device) and shows a progress bar on the terminal; Ctrl-C cancels between steps. A job's models
are checked before its first stage (`im3d models list | pull | verify | convert` gets them).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from im3d.config import PRESETS, Config, load_config
from im3d.errors import Cancelled, Im3dError, as_im3d_error, exit_code
from im3d.request import JobInputs


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="standard", choices=sorted(PRESETS), help="quality/speed preset (default: standard, the paper's setting)")
    parser.add_argument("--config", type=Path, help="JSON or TOML file of settings applied on top of the preset")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one setting, e.g. --set recon.steps=600 (repeatable)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to run (default: auto)")
    parser.add_argument("--seed", type=int, help="random seed")


def _resolve_config(args: argparse.Namespace, extra: dict | None = None) -> Config:
    overrides: dict = {}
    if getattr(args, "device", None):
        overrides.setdefault("pipeline", {})["device"] = args.device
    if getattr(args, "seed", None) is not None:
        overrides.setdefault("pipeline", {})["seed"] = args.seed
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_config(args.preset, file=args.config, overrides=overrides, assignments=args.assignments)


class TerminalProgress:
    """A tqdm bar over the job's overall fraction, with the stage message as its description."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, stage: str, fraction: float, message: str, preview=None) -> None:
        self.bar.set_description_str(message[:80])
        self.bar.n = int(fraction * 1000)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_local_job(request: JobInputs, out_dir: Path, config: Config) -> dict[str, Path]:
    """Run a job in this process with a terminal progress bar; Ctrl-C cancels between steps."""
    request.check(config.diffusion.enabled)  # before the slow imports and before --out is touched
    from im3d.weights import preflight

    preflight(config, {"kind": request.kind, "image": request.image})  # every missing model, before any stage
    prepare_out_dir(out_dir)
    from im3d.pipeline import run_job  # torch: seconds to import, so only once the job can run

    cancelled = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancelled.set())
    progress = TerminalProgress()
    try:
        return run_job(request, out_dir, config, progress, cancelled.is_set)
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)


OUTPUT_NAMES = ("mesh.glb", "splats.ply", "preview.png", "metrics.json", "config.json", "reference.png", "previews")


def prepare_out_dir(out_dir: Path) -> None:
    """A reused --out folder must not present the last run's files as this run's results: the names
    a job writes are removed first (other files are left alone); a file where the folder should be
    is a clear error."""
    import shutil

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Im3dError("invalid_request", f"--out {out_dir} is a file, not a folder; give a folder path")
    if not out_dir.exists():
        return
    stale = [p for p in out_dir.iterdir() if p.name in OUTPUT_NAMES or p.name.startswith("frames_round")]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if stale:
        print(f"note: replaced the previous results in {out_dir} ({len(stale)} files)", file=sys.stderr)


def _print_artifacts(artifacts: dict[str, Path]) -> None:
    for name, path in sorted(artifacts.items()):
        print(f"  {name:14s} {path}")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    artifacts = run_local_job(JobInputs("reconstruct", views=args.dataset), args.out, config)
    print(f"reconstructed {args.dataset} into {args.out}:")
    _print_artifacts(artifacts)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    config = _resolve_config(args, {"diffusion": {"refine_strengths": [args.strength]}} if args.strength else None)
    request = JobInputs("refine", args.prompt or "", args.negative_prompt or "", image=args.image, views=args.views)
    artifacts = run_local_job(request, args.out, config)
    print(f"refined {args.views} into {args.out}:")
    _print_artifacts(artifacts)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    request = JobInputs("generate", args.prompt or "", args.negative_prompt or "", image=args.image)
    artifacts = run_local_job(request, args.out, config)
    print(f"generated into {args.out}:")
    _print_artifacts(artifacts)
    return 0


def cmd_mesh(args: argparse.Namespace) -> int:
    from im3d.mesh import mesh_ply_to_glb

    extra = {"mesh": {}}
    if args.faces:
        extra["mesh"]["face_budget"] = args.faces
    if args.texture:
        extra["mesh"]["texture_size"] = args.texture
    config = _resolve_config(args, extra)
    progress = TerminalProgress()
    try:
        report = mesh_ply_to_glb(args.splats, args.out, config.mesh, progress=lambda f, m: progress("mesh", f, m))
    finally:
        progress.close()
    print(f"wrote {args.out}: {report}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from im3d.server import serve

    extra: dict = {"server": {}}
    if args.port:
        extra["server"]["port"] = args.port
    if args.host:
        extra["server"]["host"] = args.host
    if args.jobs_dir:
        extra["server"]["jobs_dir"] = str(args.jobs_dir)
    if args.allow_remote:
        extra["server"]["allow_remote"] = True
    config = _resolve_config(args, extra)
    from im3d.server import print_ready

    serve(config, ready=print_ready)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from im3d.demo import run_demo

    return run_demo(args.out, preset=args.preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="im3d", description="IM-3D: text/image to textured 3D mesh (backend)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="prompt or image -> textured mesh (the full IM-3D method; needs model weights)")
    p.add_argument("prompt", nargs="?", help="what to make")
    p.add_argument("--image", type=Path, help="reference image instead of (or with) the prompt")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _config_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("refine", help="re-diffuse and rebuild an object from its turntable views")
    p.add_argument("views", type=Path, help="folder with transforms.json (+ images)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--image", type=Path, help="optional reference image")
    p.add_argument("--strength", type=float, help="re-diffusion strength in (0, 1]")
    p.add_argument("--out", type=Path, required=True)
    _config_args(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("reconstruct", help="multi-view images (transforms.json) -> splats + textured mesh; no diffusion")
    p.add_argument("dataset", type=Path, help="folder with transforms.json or transforms_train.json")
    p.add_argument("--out", type=Path, required=True)
    _config_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("mesh", help="splats .ply -> textured .glb")
    p.add_argument("splats", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--faces", type=int, help="face budget")
    p.add_argument("--texture", type=int, help="texture size in pixels")
    _config_args(p)
    p.set_defaults(func=cmd_mesh)

    p = sub.add_parser("serve", help="run the HTTP API for Blender and scripts")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--jobs-dir", type=Path)
    p.add_argument("--allow-remote", action="store_true", help="accept non-loopback clients (token still required)")
    _config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the main job without weights: reconstruct the shipped Suzanne views through the service")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    p.set_defaults(func=cmd_demo)

    from im3d.weights.cli import add_models_parser

    add_models_parser(sub, _config_args)  # im3d models list | pull | verify | convert
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input ends with `error (code): what to do` and the code's exit status, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the user sees a code and a sentence; the traceback only on request
        known = as_im3d_error(error)
        if known is None:
            if os.environ.get("IM3D_DEBUG"):
                raise
            known = Im3dError("internal_error", f"unexpected error: {type(error).__name__}: {error}; run again with IM3D_DEBUG=1 for the traceback and report it")
        print(f"error ({known.code}): {known.message}", file=sys.stderr)
        return exit_code(known.code)


if __name__ == "__main__":
    sys.exit(main())
