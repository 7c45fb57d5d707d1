"""Put a verified result (mesh.glb) into the scene: IM-3D collection, name, material, placement, provenance."""

from __future__ import annotations

import re
from pathlib import Path

import bpy
from mathutils import Matrix, Vector

COLLECTION_NAME = "IM-3D"
PROVENANCE_KEYS = ("im3d_job_id", "im3d_kind", "im3d_prompt", "im3d_seed", "im3d_preset")


class ImportFailed(RuntimeError):
    pass


def object_name(prompt: str, fallback: str = "IM-3D result") -> str:
    """A readable object name from the prompt: first words, no control characters, at most 48 characters."""
    words = re.sub(r"[\x00-\x1f\x7f]+", " ", prompt).split()
    name = " ".join(words)
    if len(name) > 48:
        name = name[:48].rsplit(" ", 1)[0] or name[:48]
    return name or fallback


def result_collection(scene: bpy.types.Scene) -> bpy.types.Collection:
    collection = bpy.data.collections.get(COLLECTION_NAME)
    if collection is None:
        collection = bpy.data.collections.new(COLLECTION_NAME)
    if collection.name not in scene.collection.children and scene.user_of_id(collection) == 0:
        scene.collection.children.link(collection)
    return collection


def _gltf_import(path: Path) -> list[bpy.types.Object]:
    before = set(bpy.data.objects)
    try:
        options = {"filepath": str(path), "merge_vertices": False, "import_shading": "NORMALS"}
        known = bpy.ops.import_scene.gltf.get_rna_type().properties.keys()
        if "import_scene_as_collection" in known:  # Blender 4.5+: keep the objects flat, we file them ourselves
            options["import_scene_as_collection"] = False
        result = bpy.ops.import_scene.gltf(**options)
    except RuntimeError as error:
        _remove_objects(set(bpy.data.objects) - before)
        raise ImportFailed(f"{path.name} could not be read as glTF: {str(error).strip().splitlines()[-1]}") from None
    created = [obj for obj in bpy.data.objects if obj not in before]
    if "FINISHED" not in result or not any(obj.type == "MESH" for obj in created):
        _remove_objects(set(created))
        raise ImportFailed(f"{path.name} holds no mesh")
    return created


def _remove_objects(objects) -> None:
    meshes = {obj.data for obj in objects if obj.type == "MESH"}
    for obj in objects:
        bpy.data.objects.remove(obj)
    for mesh in meshes:
        if mesh.users == 0:
            bpy.data.meshes.remove(mesh)


def import_result(
    glb_path: str | Path,
    *,
    scene: bpy.types.Scene | None = None,
    name: str,
    provenance: dict,
    location: Vector | None = None,
    frame: Matrix | None = None,
    matrix_world: Matrix | None = None,
) -> bpy.types.Object:
    """Import `glb_path` as one mesh object named `name` in the IM-3D collection and return it.

    The file's geometry is in the world frame of the job's cameras. `frame` is the matrix the mesh
    data is expressed in (the refined original's transform, so the copy rotates and scales like it;
    identity for generated objects); `matrix_world` places the object (default: `frame`, or a
    translation to `location` — the 3D cursor for Generate). On any failure nothing new stays.
    """
    scene = scene or bpy.context.scene
    path = Path(glb_path)
    created = _gltf_import(path)
    try:
        meshes = [obj for obj in created if obj.type == "MESH"]
        obj = meshes[0]
        world = obj.matrix_world.copy()
        obj.parent = None
        obj.data.transform(world)  # bake the file's node transform (its Y-up to Z-up turn included)
        _remove_objects(set(created) - {obj})
        frame = Matrix(frame) if frame is not None else Matrix.Identity(4)
        if abs(frame.determinant()) > 1e-12:
            obj.data.transform(frame.inverted_safe())
        if matrix_world is None:
            matrix_world = Matrix.Translation(Vector(location)) @ frame if location is not None else frame
        obj.matrix_world = Matrix(matrix_world)
        obj.data.update()

        collection = result_collection(scene)
        for owner in list(obj.users_collection):
            owner.objects.unlink(obj)
        collection.objects.link(obj)
        obj.name = name
        obj.data.name = name
        for index, slot in enumerate(obj.material_slots):
            if slot.material is not None:
                slot.material.name = name if index == 0 else f"{name}.{index}"
                for node in slot.material.node_tree.nodes:
                    if node.type == "TEX_IMAGE" and node.image is not None:
                        node.image.name = f"{name} albedo"
                        if node.image.packed_file is None and node.image.source == "FILE":
                            node.image.pack()  # the .blend must not depend on the download cache
        for key, value in provenance.items():
            obj[f"im3d_{key}"] = value
        for other in scene.objects:
            other.select_set(False)
        obj.select_set(True)
        if bpy.context.view_layer is not None and obj.name in bpy.context.view_layer.objects:
            bpy.context.view_layer.objects.active = obj
        return obj
    except Exception:
        _remove_objects({o for o in created if _alive(o)})
        raise


def _alive(obj) -> bool:
    try:
        return obj.name in bpy.data.objects
    except ReferenceError:
        return False


def world_box(obj, matrix: Matrix | None = None) -> tuple[Vector, Vector]:
    """Axis-aligned world bounds of `obj` (placed at `matrix` when given)."""
    matrix = matrix if matrix is not None else obj.matrix_world
    corners = [matrix @ Vector(c) for c in obj.bound_box]
    return (Vector(tuple(min(c[i] for c in corners) for i in range(3))), Vector(tuple(max(c[i] for c in corners) for i in range(3))))


def _overlap(a: tuple[Vector, Vector], b: tuple[Vector, Vector]) -> bool:
    return all(a[0][i] < b[1][i] and b[0][i] < a[1][i] for i in range(3))


def place_beside(obj, anchor: Matrix, width: float, scene: bpy.types.Scene, avoid: set | None = None, max_tries: int = 12) -> Matrix:
    """Put `obj` (its data in `anchor`'s frame) one `width` along +X from `anchor`, further while that
    spot is taken by another visible object, so a second refine does not stack on the first copy."""
    width = max(width, 0.1)
    others = [
        world_box(o) for o in scene.objects
        if o is not obj and o.type == "MESH" and o.visible_get() and (avoid is None or o.name not in avoid)
    ]
    for step in range(1, max_tries + 1):
        matrix = Matrix.Translation(Vector((1.2 * width * step, 0.0, 0.0))) @ anchor
        box = world_box(obj, matrix)
        if not any(_overlap(box, other) for other in others):
            break
    obj.matrix_world = matrix
    return matrix
