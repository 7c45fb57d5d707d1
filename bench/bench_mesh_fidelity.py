"""Mesh fidelity benchmark: Blender ground truth -> the real fit -> mesh.glb, splats and mesh both scored.

For each object (built and rendered with Blender by bench/render_datasets.py into `--data`, 16
orbit views at 128^2 + 8 held-out views off the orbit, unlit procedural albedo), runs the product's
`reconstruct` job (`--preset fast`, LPIPS off because no backbone weights exist offline, everything
else default) and scores, at the held-out views:

  splats  PSNR / SSIM over the white background and mask IoU of the fitted splats' renders
  mesh    the same for an unlit render of `mesh.glb` as written (read back from the file: the
          texture looked up at the visible surface point; z-buffer, 4x4 supersampled)
  geometry Chamfer-L1 and F-score@0.02 of mesh.glb against the ground-truth mesh, in units of
          the ground truth's bounding-sphere radius (100k surface samples each way), and normal
          consistency (mean |cos| between the normals of closest points, both ways: the pits and
          ridges that distances hide lower it)
  times   fit and meshing seconds, and the wall time of the job

    backend/.venv/bin/python bench/bench_mesh_fidelity.py                    # all objects, table + grid into docs/
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --objects table,mug --no-docs
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --remesh            # re-mesh the cached fits only
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --held-out          # six objects no setting was tuned on
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --set mesh.method=density   # any config override
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --mesh-files ~/models/*.obj   # public models, own docs section
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --segment           # fitted and meshed as a generated job's frames (print only)
    backend/.venv/bin/python bench/bench_mesh_fidelity.py --remesh --segment  # the cached fits re-meshed so

`--mesh-files` takes meshes from files (e.g. github.com/alecjacobson/common-3d-test-models: spot,
teapot, stanford-bunny, ...; never committed), each rendered like the built objects.

Fits are cached in `--work` (splats.ply + mesh.glb per object); `--remesh` meshes the cached splats
again with the current code and config (the views come from the dataset, as in a job).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_mesh import geometry_metrics  # noqa: E402
from im3d.cameras import read_transforms  # noqa: E402
from im3d.config import load_config  # noqa: E402
from im3d.mesh.gltf import Z_UP_TO_Y_UP  # noqa: E402
from im3d.mesh.zbuffer import render_unlit, uv_texture_shader, vertex_color_shader  # noqa: E402
from im3d.splats.losses import mask_iou, psnr, ssim  # noqa: E402

OBJECTS = ["table", "mug", "bowl", "sheet", "wedge", "bumpy", "sphere", "torus", "suzanne"]
# Never used to choose a setting: run after tuning on OBJECTS, to see whether the choices carry over.
HELD_OUT = ["vase", "cone", "chair", "capsule", "rounded_box", "torus_knot"]
THIN = {"table": "legs 4 cm", "mug": "handle hole", "bowl": "walls 3 cm", "sheet": "2.5 cm board", "vase": "walls 2.5 cm", "chair": "legs 3.5 cm"}
DEFAULT_DATA = ROOT / "out" / "fidelity_data"
DEFAULT_WORK = ROOT / "out" / "fidelity_runs"
BACKGROUND = 1.0  # white, as the fit's default recon.background


# ----------------------------------------------------------------------------------------------
# 1. data and fits


def ensure_dataset(data_dir: Path, name: str, size: int, elevation: float = 15.0, mesh_file: Path | None = None) -> Path:
    folder = data_dir / name
    if not (folder / "transforms_test.json").is_file() or not (folder / "mesh.ply").is_file():
        print(f"[bench] rendering {name} with Blender into {data_dir}", file=sys.stderr, flush=True)
        source = ["--mesh-files", str(mesh_file)] if mesh_file else ["--objects", name]
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "render_datasets.py"), "--out", str(data_dir), "--size", str(size), *source, "--elevation", str(elevation)],
            check=True, stdout=subprocess.DEVNULL,
        )
    return folder


def bench_config(assignments: list[str]):
    return load_config("fast", assignments=["recon.lpips_weight=0", *assignments])


def fit_object(folder: Path, workdir: Path, assignments: list[str]) -> dict:
    """The product's reconstruct job on the dataset; returns its metrics plus the wall time."""
    from im3d.pipeline import reconstruct

    workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(assignments)
    start = time.perf_counter()
    try:
        from im3d.request import JobInputs

        request = JobInputs(kind="reconstruct", views=folder)
    except ImportError:  # before typed requests
        request = {"kind": "reconstruct", "views": str(folder)}
    reconstruct(request, workdir, config, None, None)
    wall = time.perf_counter() - start
    metrics = json.loads((workdir / "metrics.json").read_text())
    metrics["wall_s"] = wall
    (workdir / "bench.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def remesh_object(folder: Path, workdir: Path, assignments: list[str], segment: bool = False) -> dict:
    """Mesh the cached splats again with the current code (views from the dataset, as in a job;
    `segment`: as a generated job's frames, see `_views_for_meshing`)."""
    from im3d.mesh import export_glb, mesh_from_splats
    from im3d.splats.ply import read_ply

    config = bench_config(assignments)
    metrics = json.loads((workdir / "bench.json").read_text())
    splats = read_ply(workdir / "splats.ply")
    views = _views_for_meshing(folder, config, segment)
    start = time.perf_counter()
    result = mesh_from_splats(splats, config.mesh, **views)
    export_glb(result, workdir / "mesh.glb")
    metrics["timings"]["mesh_s"] = time.perf_counter() - start
    metrics["mesh"] = result.report.to_dict()
    return metrics


def _views_for_meshing(folder: Path, config, segment: bool = False) -> dict:
    """The fitted views, as the pipeline passes them to meshing (cameras, images, masks); with
    `segment`, as a generated job has them (`generated_views`)."""
    views = read_transforms(folder, "train")
    return {"views": generated_views(views, config) if segment else views}


def generated_views(views, config):
    """The views as a generated job has its frames: the object on white, its masks the product's
    segmentation of that (diffusion/foreground.py) instead of Blender's alpha."""
    from im3d.diffusion.foreground import orbit_frame_mask

    images = views.composited([BACKGROUND] * 3)
    masks = torch.stack([orbit_frame_mask(image, config.diffusion.background_threshold) for image in images])
    return dataclasses.replace(views, images=images, masks=masks)


def write_generated_dataset(folder: Path, out: Path, config) -> Path:
    """`generated_views` of the dataset's training views, written as RGBA PNGs (alpha: the mask)
    with their transforms_train.json, for the reconstruct job to fit as a generated job would."""
    from PIL import Image

    from im3d.cameras import write_transforms

    views = generated_views(read_transforms(folder, "train"), config)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"r_{i:03d}.png" for i in range(len(views.cameras))]
    for name, image, mask in zip(names, views.images, views.masks):
        rgba = torch.cat([image, mask], dim=-1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        Image.fromarray(rgba, "RGBA").save(out / name)
    write_transforms(out / "transforms_train.json", views.cameras, names)
    return out


# ----------------------------------------------------------------------------------------------
# 2. scoring


def read_glb(path: Path) -> dict:
    """vertices (Z up, world), faces, uvs, texture or vertex colours of a GLB written by im3d.mesh.gltf."""
    from io import BytesIO

    from PIL import Image

    blob = path.read_bytes()
    json_len = struct.unpack_from("<I", blob, 12)[0]
    gltf = json.loads(blob[20 : 20 + json_len])
    binary = blob[20 + json_len + 8 :]

    def accessor(index: int) -> np.ndarray:
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        dtype = {5126: "<f4", 5125: "<u4", 5121: "u1", 5123: "<u2"}[acc["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        return np.frombuffer(binary, dtype, acc["count"] * width, start).reshape(acc["count"], width)

    primitive = gltf["meshes"][0]["primitives"][0]
    attributes = primitive["attributes"]
    out = {
        "vertices": accessor(attributes["POSITION"]).astype(np.float64) @ Z_UP_TO_Y_UP,  # back to Z up
        "faces": accessor(primitive["indices"]).reshape(-1, 3).astype(np.int64),
    }
    if "TEXCOORD_0" in attributes:
        out["uvs"] = accessor(attributes["TEXCOORD_0"]).astype(np.float64)
        image = gltf["images"][0]
        view = gltf["bufferViews"][image["bufferView"]]
        png = binary[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]]
        out["texture"] = np.asarray(Image.open(BytesIO(png)).convert("RGB"))
    if "COLOR_0" in attributes:
        out["colors"] = accessor(attributes["COLOR_0"])
    return out


def render_mesh(glb: dict, cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Unlit renders [C,H,W,3] composited over white, and alphas [C,H,W,1], at `cameras`."""
    if "texture" in glb:
        shade = uv_texture_shader(glb["faces"], glb["uvs"], glb["texture"])
    else:
        shade = vertex_color_shader(glb["faces"], glb["colors"])
    colours, alphas = [], []
    for i in range(len(cameras)):
        rgb, alpha = render_unlit(
            glb["vertices"], glb["faces"], shade, cameras.viewmats[i].numpy(), cameras.Ks[i].numpy(), cameras.width, cameras.height
        )
        colours.append(rgb * alpha + BACKGROUND * (1 - alpha))
        alphas.append(alpha)
    return torch.tensor(np.stack(colours), dtype=torch.float32), torch.tensor(np.stack(alphas), dtype=torch.float32)


def render_splats(workdir: Path, cameras, config) -> tuple[torch.Tensor, torch.Tensor]:
    from im3d.splats.model import activated, sh_degree_of
    from im3d.splats.ply import read_ply
    from im3d.splats.raster import rasterize

    splats = read_ply(workdir / "splats.ply")
    p = activated(splats)
    with torch.no_grad():
        colors, alphas, _ = rasterize(
            p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], cameras.viewmats, cameras.Ks,
            cameras.width, cameras.height, sh_degree=sh_degree_of(splats),
            backgrounds=torch.full((len(cameras), 3), BACKGROUND),
        )  # fmt: skip
    return colors.clamp(0, 1), alphas


def score(folder: Path, workdir: Path, metrics: dict, config) -> dict:
    import trimesh

    test = read_transforms(folder, "test")
    targets = test.images * test.masks + BACKGROUND * (1 - test.masks)
    glb = read_glb(workdir / "mesh.glb")
    mesh_rgb, mesh_alpha = render_mesh(glb, test.cameras)
    splat_rgb, splat_alpha = render_splats(workdir, test.cameras, config)
    gt = trimesh.load(folder / "mesh.ply", force="mesh", process=True)
    geometry = geometry_metrics(glb["vertices"], glb["faces"], gt)
    return {
        "splat_psnr": float(psnr(splat_rgb, targets)),
        "splat_ssim": float(ssim(splat_rgb, targets)),
        "splat_iou": float(mask_iou(splat_alpha, test.masks)),
        "mesh_psnr": float(psnr(mesh_rgb, targets)),
        "mesh_ssim": float(ssim(mesh_rgb, targets)),
        "mesh_iou": float(mask_iou(mesh_alpha, test.masks)),
        "chamfer": float(geometry["chamfer"]),
        "fscore": float(geometry["fscore"]),
        "normals": float(geometry["normal_consistency"]),
        "faces": int(len(glb["faces"])),
        "fit_s": float(metrics["timings"].get("fit_s", float("nan"))),
        "mesh_s": float(metrics["timings"].get("mesh_s", float("nan"))),
        "wall_s": float(metrics.get("wall_s", float("nan"))),
        "gaussians": int(metrics.get("fit", {}).get("gaussians", 0)),
        "images": (targets[0], splat_rgb[0], mesh_rgb[0]),
    }


# ----------------------------------------------------------------------------------------------
# 3. report


def table(rows: dict[str, dict]) -> str:
    head = (
        "| object | thin part | Gaussians | splats PSNR / SSIM / IoU | mesh PSNR / SSIM / IoU | mesh − splats (dB) "
        "| Chamfer-L1 (r) | F@0.02 | normal consistency | faces | fit (s) | mesh (s) | job wall (s) |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {THIN.get(name, '')} | {r['gaussians']:,} | {r['splat_psnr']:.1f} / {r['splat_ssim']:.3f} / {r['splat_iou']:.3f} "
            f"| {r['mesh_psnr']:.1f} / {r['mesh_ssim']:.3f} / {r['mesh_iou']:.3f} | {r['mesh_psnr'] - r['splat_psnr']:+.1f} "
            f"| {r['chamfer']:.4f} | {r['fscore']:.3f} | {r['normals']:.3f} | {r['faces']:,} | {r['fit_s']:.1f} | {r['mesh_s']:.1f} | {r['wall_s']:.1f} |"
        )
    if len(rows) > 1:
        med = lambda k: float(np.median([r[k] for r in rows.values()]))  # noqa: E731
        lo = lambda k: float(np.min([r[k] for r in rows.values()]))  # noqa: E731
        lines.append(
            f"| **median** | | | {med('splat_psnr'):.1f} / {med('splat_ssim'):.3f} / {med('splat_iou'):.3f} "
            f"| {med('mesh_psnr'):.1f} / {med('mesh_ssim'):.3f} / {med('mesh_iou'):.3f} "
            f"| {float(np.median([r['mesh_psnr'] - r['splat_psnr'] for r in rows.values()])):+.1f} "
            f"| {med('chamfer'):.4f} | {med('fscore'):.3f} (min {lo('fscore'):.3f}) | {med('normals'):.3f} | | {med('fit_s'):.1f} | {med('mesh_s'):.1f} | {med('wall_s'):.1f} |"
        )
    return "\n".join(lines)


def picture_grid(rows: dict[str, dict], path: Path) -> None:
    """One held-out view per object: ground truth | splats | mesh, objects side by side in pairs of rows."""
    from PIL import Image

    tiles = []
    for r in rows.values():
        tiles.append(np.concatenate([t.numpy() for t in r["images"]], axis=1))
    per_row = 3
    while len(tiles) % per_row:
        tiles.append(np.ones_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i : i + per_row], axis=1) for i in range(0, len(tiles), per_row)], axis=0)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path, optimize=True)


def write_docs(markdown: str, path: Path, marker: str = "mesh-fidelity") -> None:
    """Replace the section between the markers in docs/benchmarks.md (append it when absent)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{markdown}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", default=None, help=f"comma-separated objects (default: {','.join(OBJECTS)})")
    parser.add_argument("--held-out", action="store_true", help=f"the objects no setting was tuned on: {','.join(HELD_OUT)} (own docs section and grid)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ground-truth datasets (rendered when missing)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="fits and meshes, one folder per object")
    parser.add_argument("--remesh", action="store_true", help="re-mesh cached fits instead of fitting again")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    parser.add_argument("--elevation", type=float, default=15.0, help="training orbit elevation (not 15: own data and work folders, print only)")
    parser.add_argument("--grid", type=Path, default=None, help="picture grid (default: docs/mesh_fidelity[_held_out|_public].png)")
    parser.add_argument("--segment", action="store_true", help="the views as a generated job has them: on white, masks from the product's segmentation; fits go to WORK_segment, --remesh re-meshes WORK's (print only)")
    parser.add_argument("--mesh-files", nargs="+", type=Path, default=[], help="objects from mesh files (.obj/.ply/.stl), named by file (own docs section and grid)")
    args = parser.parse_args(argv)
    files = {path.stem: path.expanduser() for path in args.mesh_files}
    names = list(files) or [n for n in (args.objects or ",".join(HELD_OUT if args.held_out else OBJECTS)).split(",") if n]
    suffix = "_public" if files else "_held_out" if args.held_out else ""  # of the docs section and its picture
    grid = args.grid or ROOT / "docs" / f"mesh_fidelity{suffix}.png"
    if files:  # their own datasets and fits: a file's name may be a built object's
        args.data, args.work = Path(f"{args.data}_public"), Path(f"{args.work}_public")
    if args.elevation != 15.0:  # another camera ring: its own datasets and fits, never the docs' tables
        suffix = f"_e{args.elevation:g}"
        args.data, args.work, args.no_docs = Path(f"{args.data}{suffix}"), Path(f"{args.work}{suffix}"), True
    args.no_docs |= args.segment  # the docs' tables are Blender's masks
    if args.segment and not args.remesh:  # new fits: never over the cached ones from Blender's masks
        args.work = Path(f"{args.work}_segment")
    config = bench_config(args.set)
    load = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {load[0]:.1f}"
    print(f"machine: {machine}; overrides: {['recon.lpips_weight=0', *args.set]}", flush=True)
    rows = {}
    for name in names:
        folder = ensure_dataset(args.data, name, 128, args.elevation, files.get(name))
        workdir = args.work / name
        if args.remesh and (workdir / "bench.json").is_file():
            metrics = remesh_object(folder, workdir, args.set, args.segment)
        elif args.segment:
            metrics = fit_object(write_generated_dataset(folder, workdir / "views", config), workdir, args.set)
        else:
            metrics = fit_object(folder, workdir, args.set)
        rows[name] = score(folder, workdir, metrics, config)
        r = rows[name]
        print(
            f"{name}: splats {r['splat_psnr']:.1f} dB, mesh {r['mesh_psnr']:.1f} dB, IoU {r['mesh_iou']:.3f}, "
            f"chamfer {r['chamfer']:.4f}, F {r['fscore']:.3f}, NC {r['normals']:.3f}, fit {r['fit_s']:.1f} s, mesh {r['mesh_s']:.1f} s",
            flush=True,
        )
    markdown = table(rows)
    print(markdown)
    if not args.no_docs:
        picture_grid(rows, grid)
        header = (
            f"Measured {time.strftime('%Y-%m-%d')} on {machine} (shared machine: load is other work running at the same time). "
            f"`--preset fast`, overrides {['recon.lpips_weight=0', *args.set]}. Picture: [{grid.name}]({grid.name}) "
            "(held-out view: ground truth | splats | mesh.glb)."
        )
        write_docs(header + "\n\n" + markdown, ROOT / "docs" / "benchmarks.md", "mesh-fidelity" + suffix.replace("_", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
