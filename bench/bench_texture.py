"""Texture benchmark: the same mesh textured from the splats' colours vs back-projected from the views.

For each object (a Blender-rendered dataset: 16 orbit views + 8 held-out views off the orbit,
unlit albedo; bench/render_datasets.py, or the shipped Suzanne), fits splats with the real fit loop
(`--preset fast`, LPIPS off: no backbone weights offline), meshes them once at the standard
texture size (1024^2), and textures that one mesh twice:

  splat bake  every texel from the splats' SH-DC colours (what `im3d mesh SPLATS.ply` does)
  view bake   back-projected from the 16 fitted views (what reconstruct / refine / generate do)

and scores unlit renders of both at the held-out views: PSNR over the white background (like the
splats' own held-out score, printed beside them) and "inside" PSNR over the pixels that both the
object's mask and the mesh's silhouette cover (the texture alone, without the geometry's
silhouette error); plus the warm bake time at 1024^2.

    backend/.venv/bin/python bench/bench_texture.py                          # suzanne + out/fidelity_data objects
    backend/.venv/bin/python bench/bench_texture.py --objects suzanne,mug --steps 200

Fits are cached in --work (splats.ply + fit.json per object).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from im3d.cameras import read_transforms  # noqa: E402
from im3d.config import load_config  # noqa: E402
from im3d.mesh import mesh_from_splats, splats_to_gaussians  # noqa: E402
from im3d.mesh.bake_views import ViewImages  # noqa: E402
from im3d.mesh.texture import UVMesh, bake_albedo  # noqa: E402
from im3d.mesh.zbuffer import render_unlit, uv_texture_shader  # noqa: E402
from im3d.splats.losses import psnr  # noqa: E402

BACKGROUND = 1.0
SUZANNE = ROOT / "backend" / "im3d" / "data" / "suzanne"


def dataset(name: str, data: Path) -> Path:
    if name == "suzanne" and not (data / name).is_dir():
        return SUZANNE
    return data / name


def fit(folder: Path, workdir: Path, config, steps: int | None) -> tuple[dict, dict]:
    """Splats fitted to the training views (cached), and their held-out PSNR."""
    from im3d.splats.fit import SplatFitter
    from im3d.splats.ply import read_ply, write_ply

    if (workdir / "splats.ply").is_file() and (workdir / "fit.json").is_file():
        return read_ply(workdir / "splats.ply"), json.loads((workdir / "fit.json").read_text())
    train, test = read_transforms(folder, "train"), read_transforms(folder, "test")
    fitter = SplatFitter(config.recon, train.cameras, train.images, train.masks, "cpu")
    started = time.perf_counter()
    result = fitter.fit(steps or config.recon.steps)
    info = {"fit_s": time.perf_counter() - started, "steps": result.steps, "gaussians": fitter.num_gaussians,
            "splats_heldout_psnr": fitter.evaluate(test.cameras, test.images, test.masks)["psnr"]}  # fmt: skip
    splats = {k: v.detach().cpu() for k, v in fitter.splats.items()}
    workdir.mkdir(parents=True, exist_ok=True)
    write_ply(workdir / "splats.ply", splats)
    (workdir / "fit.json").write_text(json.dumps(info, indent=1))
    return splats, info


def heldout_psnr(vertices, faces, uvs, texture, test) -> tuple[float, float]:
    """PSNR over the white background (whole image), and over the pixels inside both the object's
    mask and the mesh's silhouette (the texture alone, whatever the geometry's silhouette error)."""
    cams = test.cameras
    shade = uv_texture_shader(faces, uvs, texture)
    renders, alphas = [], []
    for i in range(len(cams)):
        rgb, alpha = render_unlit(vertices, faces, shade, cams.viewmats[i].double().numpy(), cams.Ks[i].double().numpy(),
                                  cams.width, cams.height)  # fmt: skip
        renders.append(rgb * alpha + BACKGROUND * (1 - alpha))
        alphas.append(alpha)
    renders = torch.tensor(np.stack(renders), dtype=torch.float32)
    alphas = torch.tensor(np.stack(alphas), dtype=torch.float32).reshape(test.masks.shape)
    targets = test.images * test.masks + BACKGROUND * (1 - test.masks)
    inside = ((alphas > 0.99) & (test.masks > 0.99))[..., 0]
    inside_mse = float(((renders - targets)[inside] ** 2).mean())
    return float(psnr(renders, targets)), 10 * float(np.log10(1.0 / max(inside_mse, 1e-12)))


def run_object(name: str, folder: Path, workdir: Path, steps: int | None, size: int) -> dict:
    config = load_config("fast", overrides={"recon": {"lpips_weight": 0.0, "l1_weight": 1.0}, "mesh": {"texture_size": size}})
    splats, info = fit(folder, workdir, config, steps)
    train, test = read_transforms(folder, "train"), read_transforms(folder, "test")
    views = ViewImages(train.cameras, train.images, train.masks)
    started = time.perf_counter()
    result = mesh_from_splats(splats, config.mesh, views=views)
    mesh_s = time.perf_counter() - started
    gaussians = splats_to_gaussians(splats)
    uv_mesh = UVMesh(result.vertices, result.faces, result.uvs, np.arange(len(result.vertices)), result.report.charts)
    blur = 0.5 * float(np.percentile(gaussians.scales.max(1), 50))
    started = time.perf_counter()
    splat_texture, _ = bake_albedo(uv_mesh, gaussians, size, blur)
    splat_bake_s = time.perf_counter() - started
    started = time.perf_counter()  # warm (JIT compiled by the meshing above)
    view_texture, stats = bake_albedo(uv_mesh, gaussians, size, blur, views=views, normals=result.normals)
    view_bake_s = time.perf_counter() - started
    row = {
        "object": name,
        "splats_heldout_psnr": info["splats_heldout_psnr"],
        "splat_bake_psnr": heldout_psnr(result.vertices, result.faces, result.uvs, splat_texture, test),
        "view_bake_psnr": heldout_psnr(result.vertices, result.faces, result.uvs, view_texture, test),
        "view_texels": stats["view_texels"],
        "splat_bake_s": splat_bake_s,
        "view_bake_s": view_bake_s,
        "faces": result.report.faces,
        "mesh_s": mesh_s,
        "fit_s": info["fit_s"],
    }
    from PIL import Image

    Image.fromarray(np.concatenate([splat_texture, view_texture], axis=1)).resize((2 * 384, 384)).save(workdir / "textures.png")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", default="suzanne,mug,bumpy,table")
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "fidelity_data")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "texture_runs")
    parser.add_argument("--steps", type=int, default=None, help="fit steps (default: the fast preset's)")
    parser.add_argument("--size", type=int, default=1024, help="texture side")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rows = []
    for name in args.objects.split(","):
        folder = dataset(name, args.data)
        if not (folder / "transforms_test.json").is_file():
            print(f"[bench] {name}: no dataset with held-out views at {folder}; render it with bench/render_datasets.py", file=sys.stderr)
            continue
        row = run_object(name, folder, args.work / name, args.steps, args.size)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| object | splats held-out PSNR | mesh, splat bake: PSNR / inside | mesh, view bake: PSNR / inside | texels from views | bake {args.size}² splat / views |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (sp, si), (vp, vi) = r["splat_bake_psnr"], r["view_bake_psnr"]
        print(f"| {r['object']} | {r['splats_heldout_psnr']:.2f} dB | {sp:.2f} / {si:.2f} dB | {vp:.2f} / {vi:.2f} dB "
              f"| {100 * r['view_texels']:.1f} % | {r['splat_bake_s']:.2f} s / {r['view_bake_s']:.2f} s |")  # fmt: skip
    print(f"\nload average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
