"""The main job as an artist meets it, in real Blender (the bpy module) with the built extension.

`run_refine_demo(out_dir)` builds and installs the extension zip into a fresh Blender user folder,
enables it, starts the local backend through the add-on's own preferences, puts the shipped Suzanne
(bench/render_datasets.py's mesh and procedural albedo) in the scene, runs **Refine Selected** with
diffusion off, and saves `refine_demo.blend` and `before_after.png` (original | refined, same camera).

    backend/.venv/bin/python tools/blender_demo.py --out out/demo [--preset fast]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "bl_ext.user_default.im3d_blender"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_extension(out_dir: Path):
    """Build + validate the zip, install and enable it; returns the enabled add-on's runtime module."""
    import bpy

    spec = importlib.util.spec_from_file_location("im3d_build", ROOT / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    zip_path = build.build_zip(out_dir)
    build.validate(zip_path)
    if PACKAGE not in bpy.context.preferences.addons:
        result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
        if result != {"FINISHED"} or PACKAGE not in bpy.context.preferences.addons:
            raise RuntimeError(f"installing {zip_path} failed: {result}")
    return sys.modules[f"{PACKAGE}.runtime"]  # loaded with the add-on; local_backend too


def _suzanne():
    import bpy

    sys.path.insert(0, str(ROOT / "bench"))
    import render_datasets

    mesh = render_datasets.build_suzanne()
    render_datasets.normalise(mesh)
    mesh.materials.append(render_datasets.albedo_material("suzanne albedo", "noise"))
    obj = bpy.data.objects.new("Suzanne", mesh)
    bpy.context.scene.collection.objects.link(obj)
    obj.location = (0.0, 0.0, 0.5)
    return obj


def before_after(original, refined, out_path: Path, size: int = 384) -> Path:
    """Original and refined rendered from the same front-left camera, side by side."""
    import bpy
    from PIL import Image

    turntable = sys.modules[f"{PACKAGE}.turntable"]
    folder = Path(tempfile.mkdtemp(prefix="im3d-before-after-"))
    hidden = {obj: (obj.hide_get(), obj.hide_render) for obj in (original, refined)}
    images = []
    for index, obj in enumerate((original, refined)):
        obj.hide_set(False)
        obj.hide_render = False
        with turntable.TurntableRender([obj], folder / str(index), [(-30.0, 15.0)], size=size, samples=32, lighting="UNIFORM") as render:
            images.append(Image.open(render.render_view(0)).convert("RGBA"))
    for obj, (hide, hide_render) in hidden.items():
        obj.hide_set(hide)
        obj.hide_render = hide_render
    sheet = Image.new("RGBA", (2 * size, size), (40, 40, 40, 255))
    for index, image in enumerate(images):
        sheet.alpha_composite(image, (index * size, 0))
    sheet.convert("RGB").save(out_path)
    bpy.context.view_layer.update()
    return out_path


def run_refine_demo(out_dir: str | Path, preset: str = "FAST", overrides: dict | None = None, extra_args: list[str] | None = None, extra_env: dict | None = None) -> dict:
    """Refine Selected on the shipped Suzanne with diffusion off; returns paths and timings."""
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="im3d-demo-user-"))
    import bpy

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = install_extension(out_dir / "dist")
    bpy.ops.wm.read_homefile(use_factory_startup=True, use_empty=True)
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    prefs.python_path, prefs.port = sys.executable, _free_port()
    local = sys.modules[f"{PACKAGE}.local_backend"]
    process = local.local_process(prefs)
    process.extra_args, process.extra_env = list(extra_args or []), dict(extra_env or {})
    try:
        original = _suzanne()
        bpy.context.view_layer.objects.active = original
        original.select_set(True)
        state = bpy.context.scene.im3d
        state.preset, state.refine_use_diffusion, state.keep_original = preset, False, True
        state.advanced_overrides = json.dumps(overrides or {})
        start = time.perf_counter()
        result = bpy.ops.im3d.refine_selected()
        seconds = time.perf_counter() - start
        if result != {"FINISHED"}:
            raise RuntimeError(f"Refine Selected failed: {state.job_error}")
        refined = bpy.data.objects[f"{original.name} refined"]
        image = before_after(original, refined, out_dir / "before_after.png")
        blend = out_dir / "refine_demo.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(blend), compress=True)
    finally:
        local.stop_backend()
    return {"blend": blend, "before_after": image, "refine_seconds": seconds, "job_id": refined["im3d_job_id"], "faces": len(refined.data.polygons)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--preset", default="FAST", choices=["FAST", "STANDARD", "HIGH"])
    parser.add_argument("--overrides", default="{}", help='JSON config overrides, e.g. {"recon": {"steps": 300}}')
    args = parser.parse_args(argv)
    info = run_refine_demo(args.out, args.preset, json.loads(args.overrides))
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
