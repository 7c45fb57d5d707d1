"""Meshing benchmark: splats -> textured GLB, accuracy against the ground-truth surface, and speed.

Until fitted splats exist, the splats are sampled densely on ground-truth surfaces (flat, opaque
discs tangent to the surface, coloured by a smooth function of position): Suzanne from
`backend/im3d/data/suzanne/mesh.ply` (rendered by bench/render_datasets.py) and trimesh primitives.

    python bench/bench_mesh.py                       # the table + faces-vs-error plot, into docs/
    python bench/bench_mesh.py --splats X.ply --gt-mesh Y.ply   # geometry metrics of any pair

Metrics, in units of the ground truth's bounding-sphere radius:
  chamfer   Chamfer-L1: mean of the two mean point-to-surface distances (100k samples each way)
  F@0.02    F-score at a distance of 0.02 radius
  colour dB PSNR of the texture against the true albedo at 100k surface points (each point takes
            the colour of the nearest baked texel): what an unlit render of the surface compares
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from im3d.config import MeshConfig  # noqa: E402
from im3d.mesh import export_glb, mesh_from_splats  # noqa: E402
from im3d.testing.synthetic import splats_on_surface, stripes_color  # noqa: E402
from im3d.mesh.texture import UVMesh, texel_surface_points  # noqa: E402
from im3d.splats.ply import read_ply, write_ply  # noqa: E402

STAGES = ["density", "marching_cubes", "decimate", "smooth", "uv_unwrap", "bake"]


def ground_truth_objects() -> dict[str, trimesh.Trimesh]:
    objects = {}
    suzanne = ROOT / "backend" / "im3d" / "data" / "suzanne" / "mesh.ply"
    if suzanne.exists():
        objects["suzanne"] = trimesh.load(suzanne, force="mesh", process=True)
    objects["sphere"] = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    objects["torus"] = trimesh.creation.torus(major_radius=0.35, minor_radius=0.12, major_sections=128, minor_sections=64)
    objects["box"] = trimesh.creation.box(extents=(0.6, 0.8, 1.0))
    return objects


def bounding_radius(mesh: trimesh.Trimesh) -> float:
    centre = 0.5 * (mesh.bounds[0] + mesh.bounds[1])
    return float(np.linalg.norm(mesh.vertices - centre, axis=1).max())


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on triangles (a, b, c) to points p, all [..., 3] (Ericson, RTCD 5.1.5)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    denom = np.where(np.abs(va + vb + vc) < 1e-30, 1e-30, va + vb + vc)
    v, w = vb / denom, vc / denom
    out = a + ab * v[..., None] + ac * w[..., None]  # inside the face
    safe = lambda x: np.where(np.abs(x) < 1e-30, 1e-30, x)  # noqa: E731
    # Edges, then vertices (later assignments win, matching the region tests' priority).
    t = d1 / safe(d1 - d3)
    out = np.where(((vc <= 0) & (d1 >= 0) & (d3 <= 0))[..., None], a + ab * t[..., None], out)
    t = d2 / safe(d2 - d6)
    out = np.where(((vb <= 0) & (d2 >= 0) & (d6 <= 0))[..., None], a + ac * t[..., None], out)
    t = (d4 - d3) / safe((d4 - d3) + (d5 - d6))
    out = np.where(((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0))[..., None], b + (c - b) * t[..., None], out)
    out = np.where(((d1 <= 0) & (d2 <= 0))[..., None], a, out)
    out = np.where(((d3 >= 0) & (d4 <= d3))[..., None], b, out)
    out = np.where(((d6 >= 0) & (d5 <= d6))[..., None], c, out)
    return out


def point_to_surface(points: np.ndarray, mesh: trimesh.Trimesh, candidates: int = 16, return_faces: bool = False):
    """Distance from each point to the mesh surface (exact over the `candidates` nearest faces);
    with return_faces, also the index of the closest face."""
    tri = mesh.triangles
    # Long thin faces: their centroid can be far from their closest point, so big meshes get split.
    _, index = cKDTree(tri.mean(axis=1)).query(points, k=min(candidates, len(tri)), workers=-1)
    index = index.reshape(len(points), -1)
    out = np.empty(len(points))
    closest = np.empty(len(points), np.int64)
    for start in range(0, len(points), 20_000):
        idx = index[start : start + 20_000]
        p = points[start : start + 20_000, None, :]
        t = tri[idx]
        q = closest_point_on_triangles(p, t[..., 0, :], t[..., 1, :], t[..., 2, :])
        distance = np.linalg.norm(q - p, axis=-1)
        out[start : start + 20_000] = distance.min(axis=1)
        closest[start : start + 20_000] = idx[np.arange(len(idx)), distance.argmin(axis=1)]
    return (out, closest) if return_faces else out


def geometry_metrics(vertices, faces, gt: trimesh.Trimesh, samples: int = 100_000, seed: int = 0) -> dict:
    """Chamfer-L1 and F-score, point-to-surface both ways, in bounding-sphere radii; normal
    consistency: mean |cos| between each sample's face normal and its closest face's on the other
    surface, both ways (1 = smooth where the truth is smooth; pits and ridges lower it)."""
    radius = bounding_radius(gt)
    produced = trimesh.Trimesh(vertices, faces, process=False)
    gt_fine = gt.subdivide_to_size(max_edge=0.02 * radius, max_iter=8) if len(gt.faces) < 200_000 else gt
    p, p_face = trimesh.sample.sample_surface(produced, samples, seed=seed)
    g, g_face = trimesh.sample.sample_surface(gt, samples, seed=seed + 1)
    d_pg, near_g = point_to_surface(p, gt_fine, return_faces=True)
    d_gp, near_p = point_to_surface(g, produced, return_faces=True)
    d_pg, d_gp = d_pg / radius, d_gp / radius
    precision, recall = (d_pg < 0.02).mean(), (d_gp < 0.02).mean()
    cos_p = np.abs(np.einsum("ij,ij->i", produced.face_normals[p_face], gt_fine.face_normals[near_g]))
    cos_g = np.abs(np.einsum("ij,ij->i", gt.face_normals[g_face], produced.face_normals[near_p]))
    return {
        "chamfer": 0.5 * (d_pg.mean() + d_gp.mean()),
        "fscore": 2 * precision * recall / max(precision + recall, 1e-12),
        "normal_consistency": 0.5 * (cos_p.mean() + cos_g.mean()),
        "radius": radius,
    }


def colour_psnr(result, gt: trimesh.Trimesh, samples: int = 100_000) -> float:
    size = result.texture.shape[0]
    uv_mesh = UVMesh(result.vertices, result.faces, result.uvs, np.arange(len(result.vertices)), 0)
    points, _, rows, cols, _ = texel_surface_points(uv_mesh, size)
    g, _ = trimesh.sample.sample_surface(gt, samples, seed=3)
    nearest = cKDTree(points).query(g, workers=-1)[1]
    baked = result.texture[rows[nearest], cols[nearest]] / 255.0
    truth = np.round(np.clip(stripes_color(g), 0, 1) * 255) / 255.0
    mse = float(((baked - truth) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def run_standard(objects, num_splats: int, out_dir: Path) -> list[dict]:
    rows = []
    for name, gt in objects.items():
        splats = splats_on_surface(gt, num_splats, stripes_color)
        config = MeshConfig()  # standard: 256^3 grid, 50k faces, 1024^2 texture
        mesh_from_splats(splats, MeshConfig(grid_resolution=32, face_budget=500, texture_size=64))  # JIT warm-up
        start = time.perf_counter()
        result = mesh_from_splats(splats, config)
        glb = out_dir / f"{name}.glb"
        t_export = time.perf_counter()
        export_glb(result, glb)
        seconds = dict(result.report.stage_seconds, export=time.perf_counter() - t_export)
        total = time.perf_counter() - start
        metrics = geometry_metrics(result.vertices, result.faces, gt)
        rows.append(
            {
                "object": name,
                "splats": len(splats["means"]),
                "faces": result.report.faces,
                "watertight": result.report.watertight,
                "components": result.report.components,
                "charts": result.report.charts,
                "chamfer": metrics["chamfer"],
                "fscore": metrics["fscore"],
                "colour_db": colour_psnr(result, gt),
                "total_s": total,
                "stages": seconds,
            }
        )
        print(f"{name}: {total:.2f} s, chamfer {metrics['chamfer']:.4f}, F {metrics['fscore']:.3f}", flush=True)
    return rows


def faces_vs_error(gt: trimesh.Trimesh, num_splats: int, budgets: list[int]) -> list[tuple[int, float, float]]:
    splats = splats_on_surface(gt, num_splats, stripes_color)
    curve = []
    for budget in budgets:
        result = mesh_from_splats(splats, MeshConfig(face_budget=budget, bake_texture=False))
        m = geometry_metrics(result.vertices, result.faces, gt)
        curve.append((result.report.faces, m["chamfer"], m["fscore"]))
        print(f"  {budget} faces: chamfer {m['chamfer']:.4f}", flush=True)
    return curve


def table(rows: list[dict]) -> str:
    head = "| object | splats | faces | watertight | charts | Chamfer-L1 (r) | F@0.02 | colour PSNR (dB) | total (s) | " + " | ".join(STAGES + ["export"]) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        shares = " | ".join(f"{100 * r['stages'].get(s, 0.0) / r['total_s']:.0f} %" for s in STAGES + ["export"])
        lines.append(
            f"| {r['object']} | {r['splats']:,} | {r['faces']:,} | {'yes' if r['watertight'] else 'no'} | {r['charts']} | "
            f"{r['chamfer']:.4f} | {r['fscore']:.3f} | {r['colour_db']:.1f} | {r['total_s']:.2f} | {shares} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splats", type=Path, help="a 3DGS .ply to mesh (with --gt-mesh)")
    parser.add_argument("--gt-mesh", type=Path, help="ground-truth mesh (any format trimesh reads)")
    parser.add_argument("--num-splats", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_mesh"), help="where GLBs are written")
    parser.add_argument("--objects", default="", help="comma-separated subset (suzanne,sphere,torus,box)")
    parser.add_argument("--no-curve", action="store_true", help="skip the faces-vs-error curve")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "mesh_faces_vs_error.png")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"numba threads {__import__('numba').get_num_threads()}")

    if args.splats or args.gt_mesh:
        if not (args.splats and args.gt_mesh):
            parser.error("--splats and --gt-mesh go together")
        gt = trimesh.load(args.gt_mesh, force="mesh", process=True)
        splats = read_ply(args.splats)
        start = time.perf_counter()
        result = mesh_from_splats(splats, MeshConfig())
        total = time.perf_counter() - start
        export_glb(result, args.out / (args.splats.stem + ".glb"))
        m = geometry_metrics(result.vertices, result.faces, gt)
        print("| splats | faces | watertight | Chamfer-L1 (r) | F@0.02 | total (s) |\n| --- | --- | --- | --- | --- | --- |")
        print(f"| {args.splats.name} | {result.report.faces:,} | {result.report.watertight} | {m['chamfer']:.4f} | {m['fscore']:.3f} | {total:.2f} |")
        return 0

    objects = ground_truth_objects()
    if args.objects:
        objects = {k: v for k, v in objects.items() if k in args.objects.split(",")}
    rows = run_standard(objects, args.num_splats, args.out)
    print(table(rows))
    if "suzanne" in objects:  # also exercise the PLY round trip on the benchmark object
        write_ply(args.out / "suzanne_splats.ply", splats_on_surface(objects["suzanne"], args.num_splats, stripes_color))
    if not args.no_curve:
        gt = objects.get("suzanne") or next(iter(objects.values()))
        budgets = [1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000]
        curve = faces_vs_error(gt, args.num_splats, budgets)
        print("| faces | Chamfer-L1 (r) | F@0.02 |\n| --- | --- | --- |")
        for faces, chamfer, fscore in curve:
            print(f"| {faces:,} | {chamfer:.4f} | {fscore:.3f} |")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("faces after decimation")
        ax.set_ylabel("Chamfer-L1 (bounding-sphere radii)")
        ax.set_title("Suzanne: faces vs error (256³ grid)" if "suzanne" in objects else "faces vs error")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
