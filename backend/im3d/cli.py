"""`im3d serve | generate | refine | reconstruct | mesh | demo` — the backend on the command line.

Every job command takes the same config options (--preset, --config FILE, --set a.b=value,
--device) and shows a progress bar on the terminal; Ctrl-C cancels between steps.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from im3d.config import PRESETS, Config, ConfigError, load_config


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
        overrides.setdefault("recon", {})["seed"] = args.seed
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


def run_local_job(request: dict, out_dir: Path, config: Config) -> dict[str, Path]:
    """Run a job in this process with a terminal progress bar; Ctrl-C cancels between steps."""
    from im3d.pipeline import run_job

    cancelled = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancelled.set())
    progress = TerminalProgress()
    try:
        return run_job(request, out_dir, config, progress, cancelled.is_set)
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)


def _print_artifacts(artifacts: dict[str, Path]) -> None:
    for name, path in sorted(artifacts.items()):
        print(f"  {name:14s} {path}")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    config = _resolve_config(args)
    artifacts = run_local_job({"kind": "reconstruct", "views": args.dataset, "seed": config.pipeline.seed}, args.out, config)
    print(f"reconstructed {args.dataset} into {args.out}:")
    _print_artifacts(artifacts)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    config = _resolve_config(args, {"diffusion": {"refine_strengths": [args.strength]}} if args.strength else None)
    request = {"kind": "refine", "views": args.views, "prompt": args.prompt or "", "negative_prompt": args.negative_prompt or "", "image": args.image, "seed": config.pipeline.seed}
    artifacts = run_local_job(request, args.out, config)
    print(f"refined {args.views} into {args.out}:")
    _print_artifacts(artifacts)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt and not args.image:
        print("error: give a prompt or --image", file=sys.stderr)
        return 2
    config = _resolve_config(args)
    request = {"kind": "generate", "prompt": args.prompt or "", "negative_prompt": args.negative_prompt or "", "image": args.image, "views": None, "seed": config.pipeline.seed}
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

    return parser


def main(argv: list[str] | None = None) -> int:
    from im3d.cameras import DatasetError
    from im3d.errors import Cancelled, PipelineError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
    except DatasetError as error:
        print(f"dataset error: {error}", file=sys.stderr)
    except PipelineError as error:
        print(f"error ({error.code}): {error.message}", file=sys.stderr)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
