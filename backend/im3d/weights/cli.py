"""`im3d models list | pull | verify | convert` (the same operations the HTTP API offers)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from im3d.weights.registry import ModelStatus, format_bytes


def add_models_parser(sub: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `im3d models ...` on the CLI's sub-parsers (`config_args` adds --preset/--set/...)."""
    models = sub.add_parser("models", help="list, download, verify and convert the models the config needs")
    msub = models.add_subparsers(dest="models_command", required=True)

    p = msub.add_parser("list", help="every model the resolved config needs: where, present/missing, sizes, licence")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--remote", action="store_true", help="ask the Hub for exact download sizes, gating and licences")
    config_args(p)
    p.set_defaults(func=cmd_list)

    p = msub.add_parser("pull", help="download (and convert) what is missing; resumable; safe to interrupt")
    p.add_argument("names", nargs="*", metavar="NAME", help="text-to-image, orbit-video, lpips-vgg, lpips-alex or a model id (default: all needed)")
    p.add_argument("--token", help="Hugging Face access token (default: $HF_TOKEN or `hf auth login`); needed for gated models")
    config_args(p)
    p.set_defaults(func=cmd_pull)

    p = msub.add_parser("verify", help="check every component's config, tensor names and shapes (no weights loaded)")
    p.add_argument("names", nargs="*", metavar="NAME")
    config_args(p)
    p.set_defaults(func=cmd_verify)

    p = msub.add_parser("convert", help="Stability's sv3d_p/sv3d_u .safetensors -> the diffusers folder the orbit pipeline loads")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)


def _config(args: argparse.Namespace) -> Any:
    from im3d.cli import _resolve_config

    return _resolve_config(args)


def status_table(statuses: list[ModelStatus]) -> str:
    if not statuses:
        return "this configuration needs no models (diffusion off, LPIPS off)"
    rows = [("name", "status", "on disk", "download", "gated", "licence", "id / where")]
    for st in statuses:
        rows.append((st.name, st.status, format_bytes(st.size_on_disk), format_bytes(st.download_bytes),
                     "yes" if st.gated else "no", st.licence or "?", f"{st.model_id} -> {st.path}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    for st in statuses:
        for problem in st.problems if not st.present else []:
            lines.append(f"  {st.name}: {problem}")
        if st.gated and not st.present:
            lines.append(f"  {st.name}: gated — accept the licence at {st.licence_url} and log in (`hf auth login`) before pulling")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    from im3d.weights.registry import model_statuses

    statuses = model_statuses(_config(args))
    if args.remote:
        from im3d.weights.pull import plan_pull

        plan_pull(statuses)  # fills exact sizes, gating and licences from the Hub
    if args.json:
        print(json.dumps([st.to_dict() for st in statuses], indent=2))
    else:
        print(status_table(statuses))
        missing = [st for st in statuses if not st.present and st.pullable]
        if missing:
            print(f"\nto fetch: im3d models pull {' '.join(st.name for st in missing)}")
    return 0


def _with_cancel(run: Callable[[Callable[[], bool]], Any]) -> Any:
    cancelled = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancelled.set())
    try:
        return run(cancelled.is_set)
    finally:
        signal.signal(signal.SIGINT, previous)


def _with_progress_bar(run: Callable[[Callable[[float, str], None], Callable[[], bool]], Any]) -> Any:
    """``run(progress, cancel)`` with a progress bar on stderr and Ctrl+C as cancel."""
    from tqdm import tqdm

    bar = tqdm(total=1000, bar_format="{l_bar}{bar}| {elapsed}<{remaining}", dynamic_ncols=True, file=sys.stderr)

    def progress(fraction: float, message: str) -> None:
        bar.set_description_str(message[:70])
        bar.n = int(fraction * 1000)
        bar.refresh()

    try:
        return _with_cancel(lambda cancel: run(progress, cancel))
    finally:
        bar.close()


def cmd_pull(args: argparse.Namespace) -> int:
    from im3d.weights.pull import pull_models

    config = _config(args)
    statuses = _with_progress_bar(
        lambda progress, cancel: pull_models(config, args.names or None, token=args.token, progress=progress, cancel=cancel)
    )
    print(status_table(statuses))
    return 0


def verify_model(st: ModelStatus) -> list[str]:
    """Problems of one present model, found without loading its weights."""
    from im3d.weights.registry import LPIPS_BACKBONES, diffusers_folder_problems

    if not st.present:
        return st.problems or [st.status]
    if st.source == "url":
        from im3d.weights.pull import expected_hash_prefix, sha256_of

        prefix = expected_hash_prefix(LPIPS_BACKBONES[st.name.removeprefix("lpips-")][0])
        digest = sha256_of(Path(st.path))
        return [] if digest.startswith(prefix) else [f"{st.path}: sha256 {digest[:8]}... does not start with {prefix}"]
    folder = Path(st.path)
    problems = diffusers_folder_problems(folder)
    if problems:
        return problems
    if st.name == "orbit-video":
        from im3d.diffusion.convert_sv3d import verify_pipeline_folder

        return list(verify_pipeline_folder(folder))
    return safetensors_headers_problems(folder)


def safetensors_headers_problems(folder: Path) -> list[str]:
    """Every .safetensors file's header must parse (a truncated or foreign file does not)."""
    from safetensors import safe_open

    problems = []
    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as f:
                if not list(f.keys()):
                    problems.append(f"{path.relative_to(folder)}: holds no tensors")
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            problems.append(f"{path.relative_to(folder)}: not a readable safetensors file ({str(error)[:120]})")
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    from im3d.weights.pull import select_statuses

    failed = 0
    for st in select_statuses(_config(args), args.names or None):
        problems = verify_model(st)
        print(f"{st.name:14s} {'ok' if not problems else 'FAILED'}  {st.path}")
        for problem in problems:
            print(f"    {problem}")
        failed += bool(problems)
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from im3d.diffusion.convert_sv3d import convert_sv3d_checkpoint

    out = _with_progress_bar(
        lambda progress, cancel: convert_sv3d_checkpoint(args.checkpoint, args.out, progress=progress, cancel=cancel, overwrite=args.overwrite)
    )
    print(f"converted {args.checkpoint} into {out}")
    return 0
