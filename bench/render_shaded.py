"""Flat-shaded renders of meshes from four sides: the bumps, pits and ripples an unlit score hides.

Each mesh (a `mesh.glb` the product wrote, or a ground-truth .ply/.obj) is one row of the picture:
grey, lit from above the camera, face normals (no smoothing hides a fold), 20° up, four azimuths,
so a Blender solid-mode look at what an artist imports.

    backend/.venv/bin/python bench/render_shaded.py out/fidelity_runs_public/cow/mesh.glb /tmp/cow_after/mesh.glb --out docs/mesh_fairing.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_mesh_fidelity import read_glb  # noqa: E402
from im3d.cameras import orbit_cameras  # noqa: E402
from im3d.mesh.zbuffer import rasterize_triangles  # noqa: E402


def load_mesh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """vertices [V, 3] (Z up) and faces [F, 3] of a product GLB or any mesh file trimesh reads."""
    if path.suffix == ".glb":
        glb = read_glb(path)
        return glb["vertices"], glb["faces"]
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


def shaded_views(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    size: int,
    azimuths: tuple[float, ...] = (20.0, 110.0, 200.0, 290.0),
) -> np.ndarray:
    """[size, size * len(azimuths)] grey in [0, 1], white background."""
    centre = 0.5 * (vertices.min(0) + vertices.max(0))
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-20
    # 40° wide, 2.6 radii away; orbit_position's azimuth 0 looks along +Y, so +90 puts azimuth 0 on +X.
    cameras = orbit_cameras(len(azimuths), 20.0, 2.6 * radius, 40.0, size, target=tuple(centre), azimuths_deg=[a + 90.0 for a in azimuths])
    tiles = []
    for viewmat, K in zip(cameras.viewmats.double().numpy(), cameras.Ks.double().numpy()):
        forward = viewmat[2, :3]  # the camera's +z (OpenCV) in world axes
        hit = rasterize_triangles(vertices, faces, viewmat, K, size, size)
        light = -forward + np.array([0.3, 0.2, 0.8])
        light /= np.linalg.norm(light)
        seen = normals[np.maximum(hit.face, 0)]
        seen = np.where((seen @ -forward)[..., None] < 0, -seen, seen)  # two-sided
        tiles.append(np.where(hit.face >= 0, 0.15 + 0.85 * np.clip(seen @ light, 0, 1), 1.0))
    return np.concatenate(tiles, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("meshes", nargs="+", type=Path, help="mesh.glb or .ply/.obj files, one row each")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--size", type=int, default=256, help="pixels per view")
    args = parser.parse_args(argv)
    from PIL import Image

    rows = [shaded_views(*load_mesh(path), args.size) for path in args.meshes]
    image = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(image).save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
