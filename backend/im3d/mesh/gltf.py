"""Binary glTF 2.0 (.glb) writer: one mesh, one PBR material with a baseColor texture.

Written by hand (a few dozen lines of JSON + buffer views) so that every byte is under our control
and passes the Khronos validator. World coordinates are Blender's (Z up); glTF is Y up, so on
disk (x, y, z) -> (x, z, -y), which Blender's importer turns back into the same Z-up frame.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from im3d.io_utils import atomic_write_bytes

Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

_FLOAT, _UINT32, _UBYTE = 5126, 5125, 5121
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


def glb_bytes(
    vertices: np.ndarray,  # [V, 3] world, Z up
    faces: np.ndarray,  # [F, 3]
    normals: np.ndarray,  # [V, 3] world, unit
    uvs: np.ndarray | None = None,  # [V, 2] glTF convention (v = 0 at the image's top)
    texture: np.ndarray | None = None,  # [H, W, 3] uint8
    vertex_colors: np.ndarray | None = None,  # [V, 3] uint8, used when there is no texture
    name: str = "im3d_mesh",
) -> bytes:
    V = len(vertices)
    assert vertices.shape == (V, 3) and normals.shape == (V, 3), (vertices.shape, normals.shape)
    assert faces.ndim == 2 and faces.shape[1] == 3 and len(faces) > 0, faces.shape
    assert (uvs is None) == (texture is None), "uvs and texture come together"
    if uvs is not None:
        assert uvs.shape == (V, 2), uvs.shape
    if vertex_colors is not None:
        assert vertex_colors.shape == (V, 3), vertex_colors.shape

    positions = (vertices @ Z_UP_TO_Y_UP.T).astype("<f4")
    normals_out = normals @ Z_UP_TO_Y_UP.T
    normals_out = (normals_out / np.linalg.norm(normals_out, axis=1, keepdims=True)).astype("<f4")

    binary = bytearray()
    buffer_views: list[dict] = []
    accessors: list[dict] = []

    def add_view(data: bytes, target: int | None = None) -> int:
        while len(binary) % 4:
            binary.append(0)
        view = {"buffer": 0, "byteOffset": len(binary), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        binary.extend(data)
        buffer_views.append(view)
        return len(buffer_views) - 1

    def add_accessor(array: np.ndarray, component: int, kind: str, target: int, normalized: bool = False, bounds: bool = False) -> int:
        accessor = {
            "bufferView": add_view(np.ascontiguousarray(array).tobytes(), target),
            "componentType": component,
            "count": int(array.shape[0]),
            "type": kind,
        }
        if normalized:
            accessor["normalized"] = True
        if bounds:
            accessor["min"] = np.asarray(array.min(axis=0), dtype=np.float64).ravel().tolist()
            accessor["max"] = np.asarray(array.max(axis=0), dtype=np.float64).ravel().tolist()
        accessors.append(accessor)
        return len(accessors) - 1

    attributes = {
        "POSITION": add_accessor(positions, _FLOAT, "VEC3", _ARRAY_BUFFER, bounds=True),
        "NORMAL": add_accessor(normals_out, _FLOAT, "VEC3", _ARRAY_BUFFER),
    }
    material: dict = {
        "name": f"{name}_material",
        "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 1.0},
        "doubleSided": False,
    }
    gltf: dict = {"asset": {"version": "2.0", "generator": "im3d"}}
    if uvs is not None and texture is not None:
        attributes["TEXCOORD_0"] = add_accessor(uvs.astype("<f4"), _FLOAT, "VEC2", _ARRAY_BUFFER)
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(texture, dtype=np.uint8), "RGB").save(png, format="PNG", compress_level=1)
        gltf["images"] = [{"name": f"{name}_albedo", "mimeType": "image/png", "bufferView": add_view(png.getvalue())}]
        gltf["samplers"] = [
            {"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}
        ]
        gltf["textures"] = [{"sampler": 0, "source": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0, "texCoord": 0}
    elif vertex_colors is not None:
        rgba = np.concatenate([vertex_colors, np.full((V, 1), 255, np.uint8)], axis=1).astype(np.uint8)
        attributes["COLOR_0"] = add_accessor(rgba, _UBYTE, "VEC4", _ARRAY_BUFFER, normalized=True)
    indices = add_accessor(faces.reshape(-1).astype("<u4"), _UINT32, "SCALAR", _ELEMENT_ARRAY_BUFFER, bounds=True)
    accessors[indices]["min"] = [int(accessors[indices]["min"][0])]
    accessors[indices]["max"] = [int(accessors[indices]["max"][0])]

    gltf.update(
        {
            "scene": 0,
            "scenes": [{"nodes": [0]}],
            "nodes": [{"name": name, "mesh": 0}],
            "meshes": [{"name": name, "primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]}],
            "materials": [material],
            "accessors": accessors,
            "bufferViews": buffer_views,
            "buffers": [{"byteLength": 0}],
        }
    )
    while len(binary) % 4:
        binary.append(0)
    gltf["buffers"][0]["byteLength"] = len(binary)
    json_chunk = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    json_chunk += b" " * (-len(json_chunk) % 4)
    total = 12 + 8 + len(json_chunk) + 8 + len(binary)
    out = bytearray(struct.pack("<III", 0x46546C67, 2, total))
    out += struct.pack("<II", len(json_chunk), 0x4E4F534A) + json_chunk
    out += struct.pack("<II", len(binary), 0x004E4942) + binary
    return bytes(out)


def write_glb(path: str | Path, **kwargs) -> None:
    """`glb_bytes(**kwargs)` written atomically to `path`."""
    atomic_write_bytes(Path(path), glb_bytes(**kwargs))
