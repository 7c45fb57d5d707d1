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
    beside: bpy.types.Object | None = None,
) -> bpy.types.Object:
    """Import `glb_path` as one mesh object named `name` in the IM-3D collection and return it.

    Generate results (centred on the origin, resting on z = 0) go to `location` (the 3D cursor).
    Refine results are in the world frame of the turntable that rendered `beside`: the new object
    gets `beside`'s transform and sits next to it, one bounding-box width along +X.
    On any failure nothing new stays in the scene.
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
        obj.matrix_world = Matrix.Identity(4)
        if beside is not None:
            original = beside.matrix_world.copy()
            obj.data.transform(original.inverted_safe())
            width = max(beside.dimensions.x, 0.1)
            obj.matrix_world = Matrix.Translation(Vector((1.2 * width, 0.0, 0.0))) @ original
        elif location is not None:
            obj.matrix_world = Matrix.Translation(location)
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
