"""Ground-truth multi-view datasets rendered with Blender (the `bpy` module).

Each object is built from Blender primitives and modifiers, centred on the origin, about 1 m across,
with an unlit procedural albedo (an emission shader driven by a procedural texture, so there is
texture to reconstruct), rendered with Cycles on the CPU into a transparent film:

    DIR/<object>/transforms_train.json + train/r_XXX.png   16 views on an orbit (elevation 15 deg, --elevation)
    DIR/<object>/transforms_test.json  + test/r_XXX.png    8 held-out views off that orbit
    DIR/<object>/mesh.ply                                   the ground-truth mesh, world frame

    python bench/render_datasets.py --out /tmp/gt --size 128 --objects suzanne,mug,rounded_box,torus_knot
    python bench/render_datasets.py --out /tmp/gt --mesh-files ~/models/spot.obj,~/models/teapot.obj

`--mesh-files` renders meshes from files instead (OBJ, PLY, STL; Y-up as such files usually are,
turned Z-up on import), each named after its file, with a procedural albedo chosen by that name:
public test models, e.g. github.com/alecjacobson/common-3d-test-models, are objects no setting
was tuned on.

The repository ships `backend/im3d/data/suzanne/` (the demo dataset) made by `--out backend/im3d/data --size 128 --objects suzanne`.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import bpy  # first: bmesh and mathutils come with it
import bmesh
from mathutils import Matrix, Vector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from im3d_blender.turntable import TurntableRender, orbit_views  # noqa: E402

TRAIN_ELEVATION_DEG = 15.0
# Held-out views: between the training azimuths and at other elevations, so they test 3D, not interpolation.
TEST_VIEWS = [(22.5 + 45.0 * i, elevation) for i, elevation in enumerate([35.0, -10.0, 50.0, 0.0] * 2)]


# ----------------------------------------------------------------------------------------------
# 1. geometry


def _evaluated_mesh(obj: bpy.types.Object, name: str) -> bpy.types.Mesh:
    """The object's mesh with its modifiers applied, as a new datablock."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    mesh = bpy.data.meshes.new_from_object(obj.evaluated_get(depsgraph), depsgraph=depsgraph)
    mesh.name = name
    return mesh


def _object_with_modifiers(mesh: bpy.types.Mesh, modifiers: Callable[[bpy.types.Object], None]) -> bpy.types.Mesh:
    scene = bpy.context.scene
    temporary = bpy.data.objects.new("build", mesh)
    scene.collection.objects.link(temporary)
    modifiers(temporary)
    result = _evaluated_mesh(temporary, mesh.name)
    bpy.data.objects.remove(temporary)
    return result


def _bmesh_to_mesh(name: str, build: Callable[[bmesh.types.BMesh], None]) -> bpy.types.Mesh:
    bm = bmesh.new()
    build(bm)
    mesh = bpy.data.meshes.new(name)
    bm.to_mesh(mesh)
    bm.free()
    return mesh


def build_suzanne() -> bpy.types.Mesh:
    mesh = _bmesh_to_mesh("suzanne", lambda bm: bmesh.ops.create_monkey(bm))

    def modifiers(obj):
        obj.modifiers.new("subdivision", "SUBSURF").levels = 1

    return _object_with_modifiers(mesh, modifiers)


def _torus(bm: bmesh.types.BMesh, major: float, minor: float, segments: int, rings: int, matrix: Matrix) -> None:
    grid = []
    for i in range(segments):
        u = 2 * math.pi * i / segments
        ring = []
        for j in range(rings):
            v = 2 * math.pi * j / rings
            r = major + minor * math.cos(v)
            ring.append(bm.verts.new(matrix @ Vector((r * math.cos(u), r * math.sin(u), minor * math.sin(v)))))
        grid.append(ring)
    for i in range(segments):
        for j in range(rings):
            a, b = grid[i][j], grid[(i + 1) % segments][j]
            c, d = grid[(i + 1) % segments][(j + 1) % rings], grid[i][(j + 1) % rings]
            bm.faces.new((a, b, c, d))


def build_mug() -> bpy.types.Mesh:
    body = _bmesh_to_mesh(
        "mug",
        lambda bm: bmesh.ops.create_cone(
            bm, cap_ends=True, cap_tris=False, segments=48, radius1=0.35, radius2=0.35, depth=0.9
        ),
    )
    # The handle: a torus standing in the XZ plane, half sunk into the body, joined by a boolean union.
    handle_mesh = _bmesh_to_mesh(
        "mug handle", lambda bm: _torus(bm, 0.22, 0.06, 32, 12, Matrix.Translation((0.38, 0, 0)) @ Matrix.Rotation(math.pi / 2, 4, "X"))
    )
    handle = bpy.data.objects.new("mug handle", handle_mesh)
    bpy.context.scene.collection.objects.link(handle)

    def modifiers(obj):
        union = obj.modifiers.new("handle", "BOOLEAN")
        union.operation, union.solver, union.object = "UNION", "EXACT", handle

    result = _object_with_modifiers(body, modifiers)
    bpy.data.objects.remove(handle)
    return result


def build_rounded_box() -> bpy.types.Mesh:
    def cube(bm):
        bmesh.ops.create_cube(bm, size=1.0, matrix=Matrix.Diagonal((1.0, 0.7, 0.55, 1.0)))

    def modifiers(obj):
        bevel = obj.modifiers.new("bevel", "BEVEL")
        bevel.width, bevel.segments = 0.12, 4
        obj.modifiers.new("subdivision", "SUBSURF").levels = 1

    return _object_with_modifiers(_bmesh_to_mesh("rounded_box", cube), modifiers)


def build_torus_knot(p: int = 2, q: int = 3) -> bpy.types.Mesh:
    curve = bpy.data.curves.new("torus_knot", "CURVE")
    curve.dimensions = "3D"
    curve.bevel_depth, curve.bevel_resolution = 0.09, 4
    spline = curve.splines.new("POLY")
    count = 160
    spline.points.add(count - 1)
    for i in range(count):
        t = 2 * math.pi * i / count
        r = 0.6 + 0.25 * math.cos(q * t)
        spline.points[i].co = (r * math.cos(p * t), r * math.sin(p * t), 0.25 * math.sin(q * t), 1.0)
    spline.use_cyclic_u = True
    obj = bpy.data.objects.new("torus_knot", curve)
    bpy.context.scene.collection.objects.link(obj)
    mesh = _evaluated_mesh(obj, "torus_knot")
    bpy.data.objects.remove(obj)
    bpy.data.curves.remove(curve)
    return mesh


def _box(bm: bmesh.types.BMesh, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> None:
    """An axis-aligned box from corner `lo` to corner `hi`, added to `bm` (a closed component)."""
    centre = [(a + b) / 2 for a, b in zip(lo, hi)]
    size = [b - a for a, b in zip(lo, hi)]
    bmesh.ops.create_cube(bm, size=1.0, matrix=Matrix.Translation(centre) @ Matrix.Diagonal((*size, 1.0)))


def _four_legs(bm: bmesh.types.BMesh, xs: tuple[float, float], ys: tuple[float, float], side: float, height: float) -> None:
    """Square legs `side` thick from the ground up to `height`, their corners at every (x, y)."""
    for x in xs:
        for y in ys:
            _box(bm, (x, y, 0.0), (x + side, y + side, height))


def build_table() -> bpy.types.Mesh:
    """Thin parts: a 1 x 0.7 top, 4 cm thick, on four 4 cm square legs 0.6 m long (touching, not overlapping)."""

    def build(bm):
        _box(bm, (-0.5, -0.35, 0.6), (0.5, 0.35, 0.64))
        _four_legs(bm, (-0.44, 0.40), (-0.29, 0.25), 0.04, 0.6)

    return _bmesh_to_mesh("table", build)


def build_bowl() -> bpy.types.Mesh:
    """A concavity: the lower half of a sphere, 3 cm thick walls (solidify), open at the top."""

    def build(bm):
        bmesh.ops.create_uvsphere(bm, u_segments=64, v_segments=32, radius=0.5)
        bmesh.ops.delete(bm, geom=[v for v in bm.verts if v.co.z > 1e-6], context="VERTS")

    def modifiers(obj):
        solid = obj.modifiers.new("walls", "SOLIDIFY")
        solid.thickness, solid.offset = 0.03, -1.0
        obj.modifiers.new("subdivision", "SUBSURF").levels = 1

    return _object_with_modifiers(_bmesh_to_mesh("bowl", build), modifiers)


def build_sheet() -> bpy.types.Mesh:
    """A flat sheet: a 0.9 x 0.7 board, 2.5 cm thick, standing tilted 20 degrees from vertical."""

    def build(bm):
        bmesh.ops.create_cube(bm, size=1.0, matrix=Matrix.Rotation(math.radians(70), 4, "X") @ Matrix.Diagonal((0.9, 0.7, 0.025, 1.0)))

    return _bmesh_to_mesh("sheet", build)


def build_wedge() -> bpy.types.Mesh:
    """Sharp edges: a triangular prism (a door wedge) with a 30 degree ridge, unsmoothed."""

    def build(bm):
        profile = [(-0.5, 0.0), (0.5, 0.0), (-0.5, 0.58)]  # (y, z): a right triangle, 30 deg at y = +0.5
        front = [bm.verts.new((-0.3, y, z)) for y, z in profile]
        back = [bm.verts.new((0.3, y, z)) for y, z in profile]
        bm.faces.new(front[::-1])
        bm.faces.new(back)
        for i in range(3):
            j = (i + 1) % 3
            bm.faces.new((front[i], front[j], back[j], back[i]))
        bmesh.ops.recalc_face_normals(bm, faces=bm.faces)

    return _bmesh_to_mesh("wedge", build)


def build_bumpy() -> bpy.types.Mesh:
    """Fine bumps: a sphere whose radius carries a 4 % ripple of 8 bumps around (displaced in place)."""

    def build(bm):
        bmesh.ops.create_icosphere(bm, subdivisions=6, radius=0.5)
        for v in bm.verts:
            n = v.co.normalized()
            v.co = n * (0.5 + 0.02 * math.sin(8 * math.atan2(n.y, n.x)) * math.sin(8 * math.acos(max(-1.0, min(1.0, n.z)))))

    return _bmesh_to_mesh("bumpy", build)


def build_sphere() -> bpy.types.Mesh:
    return _bmesh_to_mesh("sphere", lambda bm: bmesh.ops.create_icosphere(bm, subdivisions=5, radius=0.5))


def build_torus() -> bpy.types.Mesh:
    return _bmesh_to_mesh("torus", lambda bm: _torus(bm, 0.35, 0.13, 96, 32, Matrix.Rotation(math.radians(30), 4, "X")))


# Held out of every tuning choice (bench/bench_mesh_fidelity.py --held-out): shapes the nine tuned
# objects do not cover, to see whether the meshing's settings carry over.


def build_vase() -> bpy.types.Mesh:
    """A surface of revolution narrowing to a small foot and a neck, open at the top, 2.5 cm walls."""

    def build(bm):
        profile = [(0.0, -0.45), (0.12, -0.45), (0.24, -0.32), (0.3, -0.08), (0.24, 0.16), (0.13, 0.32), (0.16, 0.45)]
        verts = [bm.verts.new((r, 0.0, z)) for r, z in profile]
        edges = [bm.edges.new((a, b)) for a, b in zip(verts, verts[1:])]
        bmesh.ops.spin(bm, geom=verts + edges, cent=(0, 0, 0), axis=(0, 0, 1), angle=2 * math.pi, steps=64, use_merge=True)
        bmesh.ops.remove_doubles(bm, verts=bm.verts, dist=1e-6)
        bmesh.ops.recalc_face_normals(bm, faces=bm.faces)

    def modifiers(obj):
        solid = obj.modifiers.new("walls", "SOLIDIFY")
        solid.thickness, solid.offset = 0.025, -1.0

    return _object_with_modifiers(_bmesh_to_mesh("vase", build), modifiers)


def build_cone() -> bpy.types.Mesh:
    """A wide flat base and a sharp apex."""
    return _bmesh_to_mesh(
        "cone", lambda bm: bmesh.ops.create_cone(bm, cap_ends=True, cap_tris=False, segments=64, radius1=0.45, radius2=0.0, depth=0.8)
    )


def build_chair() -> bpy.types.Mesh:
    """Thin parts and a concave corner: a 0.45 m seat, 3.5 cm legs, a back panel 3 cm thick."""

    def build(bm):
        _box(bm, (-0.225, -0.225, 0.42), (0.225, 0.225, 0.46))
        _four_legs(bm, (-0.225, 0.19), (-0.225, 0.19), 0.035, 0.42)
        _box(bm, (-0.225, 0.195, 0.46), (0.225, 0.225, 0.9))

    return _bmesh_to_mesh("chair", build)


def build_capsule() -> bpy.types.Mesh:
    """A round underside lying down: a capsule along x (hemispherical ends on a cylinder)."""

    def build(bm):
        bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=0.25)
        for v in bm.verts:  # rotate the poles onto x, then pull the halves apart
            v.co = Vector((v.co.z, v.co.y, -v.co.x))
            v.co.x += 0.3 if v.co.x > 1e-6 else (-0.3 if v.co.x < -1e-6 else 0.0)

    return _bmesh_to_mesh("capsule", build)


BUILDERS: dict[str, Callable[[], bpy.types.Mesh]] = {
    "suzanne": build_suzanne,
    "mug": build_mug,
    "rounded_box": build_rounded_box,
    "torus_knot": build_torus_knot,
    "table": build_table,
    "bowl": build_bowl,
    "sheet": build_sheet,
    "wedge": build_wedge,
    "bumpy": build_bumpy,
    "sphere": build_sphere,
    "torus": build_torus,
    "vase": build_vase,
    "cone": build_cone,
    "chair": build_chair,
    "capsule": build_capsule,
}


def build_from_file(path: Path) -> bpy.types.Mesh:
    """A mesh file's triangles joined into one mesh (Y-up files turned Z-up by the importers)."""
    importers = {".obj": bpy.ops.wm.obj_import, ".ply": bpy.ops.wm.ply_import, ".stl": bpy.ops.wm.stl_import}
    if path.suffix.lower() not in importers:
        raise SystemExit(f"cannot read {path}: use an .obj, .ply or .stl file")
    if not path.is_file():
        raise SystemExit(f"no mesh file at {path}")
    importers[path.suffix.lower()](filepath=str(path), forward_axis="NEGATIVE_Z", up_axis="Y")
    parts = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
    if not parts:
        raise SystemExit(f"{path} holds no mesh")
    bm = bmesh.new()
    for obj in parts:  # the importers may split a file into objects; the ground truth is their union
        part = obj.data.copy()
        part.transform(obj.matrix_world)
        bm.from_mesh(part)
        bpy.data.meshes.remove(part)
    for obj in parts:
        bpy.data.objects.remove(obj)
    mesh = bpy.data.meshes.new(path.stem)
    bm.to_mesh(mesh)
    bm.free()
    return mesh


def normalise(mesh: bpy.types.Mesh, size: float = 1.0) -> None:
    """Centre the mesh's bounding box on the origin and scale its largest side to `size` metres."""
    xs, ys, zs = ([v.co[i] for v in mesh.vertices] for i in range(3))
    low = Vector((min(xs), min(ys), min(zs)))
    high = Vector((max(xs), max(ys), max(zs)))
    scale = size / max(high - low)
    mesh.transform(Matrix.Scale(scale, 4) @ Matrix.Translation(-(low + high) / 2))
    mesh.update()


# ----------------------------------------------------------------------------------------------
# 2. unlit procedural albedo


def _ramp(nodes, links, source, colors):
    ramp = nodes.new("ShaderNodeValToRGB")
    elements = ramp.color_ramp.elements
    while len(elements) < len(colors):
        elements.new(0.5)
    for element, (position, color) in zip(elements, colors):
        element.position, element.color = position, (*color, 1.0)
    links.new(source, ramp.inputs["Fac"])
    return ramp.outputs["Color"]


def albedo_material(name: str, pattern: str) -> bpy.types.Material:
    """Emission (strength 1) of a procedural texture in object space: renders exactly the albedo."""
    material = bpy.data.materials.new(name)
    nodes, links = material.node_tree.nodes, material.node_tree.links
    nodes.clear()
    coords = nodes.new("ShaderNodeTexCoord").outputs["Object"]
    if pattern == "noise":
        texture = nodes.new("ShaderNodeTexNoise")
        texture.inputs["Scale"].default_value = 3.0
        links.new(coords, texture.inputs["Vector"])
        color = _ramp(nodes, links, texture.outputs["Fac"], [(0.35, (0.9, 0.35, 0.05)), (0.5, (0.05, 0.45, 0.5)), (0.65, (0.95, 0.9, 0.7))])
    elif pattern == "checker":
        texture = nodes.new("ShaderNodeTexChecker")
        texture.inputs["Scale"].default_value = 4.0
        texture.inputs["Color1"].default_value = (0.8, 0.08, 0.05, 1.0)
        texture.inputs["Color2"].default_value = (0.9, 0.9, 0.85, 1.0)
        links.new(coords, texture.inputs["Vector"])
        color = texture.outputs["Color"]
    elif pattern == "wave":
        texture = nodes.new("ShaderNodeTexWave")
        texture.inputs["Scale"].default_value = 2.0
        texture.inputs["Distortion"].default_value = 4.0
        links.new(coords, texture.inputs["Vector"])
        color = _ramp(nodes, links, texture.outputs["Fac"], [(0.2, (0.05, 0.15, 0.6)), (0.8, (0.95, 0.8, 0.1))])
    elif pattern == "gradient":
        texture = nodes.new("ShaderNodeTexGradient")
        texture.gradient_type = "RADIAL"
        links.new(coords, texture.inputs["Vector"])
        color = _ramp(nodes, links, texture.outputs["Fac"], [(0.0, (0.5, 0.05, 0.6)), (0.5, (0.1, 0.7, 0.2)), (1.0, (0.5, 0.05, 0.6))])
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 1.0
    links.new(color, emission.inputs["Color"])
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return material


PATTERNS = {
    "suzanne": "noise", "mug": "checker", "rounded_box": "wave", "torus_knot": "gradient", "table": "wave",
    "bowl": "checker", "sheet": "noise", "wedge": "checker", "bumpy": "gradient", "sphere": "noise", "torus": "wave",
    "vase": "wave", "cone": "noise", "chair": "checker", "capsule": "gradient",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 3. ground-truth mesh file


def write_ply(mesh: bpy.types.Mesh, path: Path) -> None:
    """Binary little-endian PLY of the mesh's triangles (world frame: the object sits at identity)."""
    mesh.calc_loop_triangles()
    vertices = [v.co for v in mesh.vertices]
    triangles = [t.vertices for t in mesh.loop_triangles]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment im3d ground truth, Blender world frame (Z up, metres)\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(triangles)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    with open(path, "wb") as file:
        file.write(header.encode("ascii"))
        file.write(b"".join(struct.pack("<3f", *co) for co in vertices))
        file.write(b"".join(struct.pack("<B3i", 3, *tri) for tri in triangles))


# ----------------------------------------------------------------------------------------------
# 4. datasets


def render_dataset(
    name: str, out_dir: Path, size: int, samples: int, fov_deg: float, elevation_deg: float = TRAIN_ELEVATION_DEG, mesh_file: Path | None = None,
) -> dict:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    mesh = build_from_file(mesh_file) if mesh_file else BUILDERS[name]()
    mesh.name = name
    normalise(mesh)
    mesh.materials.clear()  # a file's own materials: one procedural albedo instead, as for the built objects
    mesh.polygons.foreach_set("material_index", [0] * len(mesh.polygons))
    pattern = PATTERNS.get(name, ("noise", "checker", "wave", "gradient")[sum(map(ord, name)) % 4])
    mesh.materials.append(albedo_material(f"{name} albedo", pattern))
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_ply(mesh, out_dir / "mesh.ply")
    settings = dict(size=size, fov_deg=fov_deg, engine="CYCLES", samples=samples, lighting="NONE")
    splits = {
        "train": orbit_views(16, elevation_deg),
        "test": TEST_VIEWS,
    }
    distance = None
    for split, views in splits.items():
        with TurntableRender(
            [obj], out_dir, views, image_dir=split, json_name=f"transforms_{split}.json", image_prefix="r_",
            distance=distance, **settings,
        ) as turntable:
            turntable.render_all()
            distance = turntable.distance  # the held-out views share the training views' distance
            turntable.write_transforms({"object": name, "split": split, "triangles": len(mesh.loop_triangles)})
    return {"object": name, "vertices": len(mesh.vertices), "triangles": len(mesh.loop_triangles)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per object)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--objects", default="suzanne,mug,rounded_box,torus_knot", help=f"comma-separated, from {','.join(BUILDERS)}")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (anti-aliasing only: the albedo is unlit)")
    parser.add_argument("--fov", type=float, default=40.0, help="field of view in degrees")
    parser.add_argument("--elevation", type=float, default=TRAIN_ELEVATION_DEG, help="the training orbit's elevation in degrees")
    parser.add_argument("--mesh-files", default="", help="comma-separated mesh files (.obj/.ply/.stl) to render instead of --objects")
    args = parser.parse_args(argv)
    files = {Path(f).expanduser().stem: Path(f).expanduser() for f in args.mesh_files.split(",") if f.strip()}
    names = list(files) or [n.strip() for n in args.objects.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS and n not in files]
    if unknown:
        parser.error(f"unknown object(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    print(f"{'object':<12} {'vertices':>9} {'triangles':>9} {'seconds':>8}")
    for name in names:
        start = time.perf_counter()
        info = render_dataset(name, args.out / name, args.size, args.samples, args.fov, args.elevation, files.get(name))
        print(f"{name:<12} {info['vertices']:>9} {info['triangles']:>9} {time.perf_counter() - start:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
