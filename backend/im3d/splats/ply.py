"""Splats <-> PLY in the standard 3D Gaussian Splatting layout (what common splat viewers open).

One `vertex` element, binary little-endian float32 properties, in this order:

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3K-1)  opacity  scale_0..2  rot_0..3

`opacity` is the logit, `scale_*` the log-scales, `rot_*` the quaternion w,x,y,z; `f_rest` is stored
channel-major (all K coefficients of red, then green, then blue), as the reference 3DGS code writes
it. The normals are zeros: viewers ignore them, but some expect the properties to be there.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from im3d.errors import Im3dError
from im3d.io_utils import atomic_write_bytes


class PlyError(Im3dError, ValueError):
    """The file is not a splat PLY this reader understands; the message says why."""

    def __init__(self, message: str):
        super().__init__("invalid_ply", message)


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip

_REQUIRED = (
    ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)


def splat_property_names(num_rest: int) -> list[str]:
    """Property order of the 3DGS layout; `num_rest` is K, the SH coefficients beyond degree 0."""
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * num_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def splats_to_ply_bytes(splats: dict[str, Tensor]) -> bytes:
    """Encode a splat dict (`means, quats, scales, opacities, sh0, shN`) as a binary PLY."""
    params = {k: _as_numpy(splats, k) for k in ("means", "quats", "scales", "opacities", "sh0")}
    N = params["means"].shape[0]
    shN = _as_numpy(splats, "shN") if "shN" in splats else np.zeros((N, 0, 3), np.float32)
    K = shN.shape[1]
    expected = {"means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,), "sh0": (N, 1, 3), "shN": (N, K, 3)}
    for name, array in {**params, "shN": shN}.items():
        if array.shape != expected[name]:
            raise ValueError(f"splats['{name}'] has shape {tuple(array.shape)}, expected {expected[name]}")
    columns = [
        params["means"],
        np.zeros((N, 3), np.float32),
        params["sh0"].reshape(N, 3),
        shN.transpose(0, 2, 1).reshape(N, 3 * K),  # channel-major, as 3DGS writes f_rest
        params["opacities"][:, None],
        params["scales"],
        params["quats"],
    ]
    data = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")
    names = splat_property_names(K)
    assert data.shape == (N, len(names)), data.shape
    header = ["ply", "format binary_little_endian 1.0", "comment written by im3d", f"element vertex {N}"]
    header += [f"property float {name}" for name in names]
    header.append("end_header")
    return ("\n".join(header) + "\n").encode("ascii") + data.tobytes()


def write_ply(path: str | Path, splats: dict[str, Tensor]) -> None:
    """Write `splats` as a standard 3DGS PLY, atomically."""
    atomic_write_bytes(Path(path), splats_to_ply_bytes(splats))


def read_ply(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a 3DGS PLY back into a splat dict of float32 tensors on `device`."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise PlyError(f"cannot read splat file {path}: {error.strerror}") from None
    return ply_bytes_to_splats(blob, source=str(path), device=device)


def ply_bytes_to_splats(blob: bytes, source: str = "<bytes>", device: str | torch.device = "cpu") -> dict[str, Tensor]:
    vertex_count, properties, data_start, fmt = _parse_header(blob, source)
    missing = [name for name in _REQUIRED if name not in properties]
    if missing:
        raise PlyError(
            f"{source} is a PLY file but not 3D Gaussian splats: missing vertex properties "
            f"{', '.join(missing)} (expected the standard 3DGS layout: x y z f_dc_* opacity scale_* rot_*)"
        )
    dtype = np.dtype([(name, ("<" if fmt == "binary_little_endian" else ">") + t) for name, t in properties.items()])
    if fmt == "ascii":
        try:
            text = blob[data_start:].decode("ascii").split()
            values = np.array(text[: vertex_count * len(properties)], dtype=np.float64)
        except (UnicodeDecodeError, ValueError):
            raise PlyError(f"{source}: the ASCII vertex data is not numbers") from None
        if values.size != vertex_count * len(properties):
            raise PlyError(f"{source}: the file is truncated ({values.size} of {vertex_count * len(properties)} values)")
        table = values.reshape(vertex_count, len(properties))
        column = {name: table[:, i] for i, name in enumerate(properties)}
    else:
        needed = vertex_count * dtype.itemsize
        if len(blob) - data_start < needed:
            raise PlyError(
                f"{source}: the file is truncated: {vertex_count} vertices need {needed} bytes of data, "
                f"found {len(blob) - data_start}"
            )
        records = np.frombuffer(blob, dtype=dtype, count=vertex_count, offset=data_start)
        column = {name: records[name] for name in properties}

    rest_names = sorted((n for n in properties if n.startswith("f_rest_")), key=lambda n: int(n[7:]))
    if [int(n[7:]) for n in rest_names] != list(range(len(rest_names))) or len(rest_names) % 3:
        raise PlyError(f"{source}: f_rest_* properties must be f_rest_0..f_rest_(3K-1), found {len(rest_names)}")
    K = len(rest_names) // 3
    degree = math.isqrt(K + 1) - 1
    if (degree + 1) ** 2 - 1 != K:
        raise PlyError(f"{source}: {len(rest_names)} f_rest_* properties do not match any SH degree (expected 0, 9, 24 or 45)")

    def stack(names: list[str]) -> np.ndarray:
        if not names:
            return np.zeros((vertex_count, 0), np.float32)
        return np.stack([np.asarray(column[n], dtype=np.float32) for n in names], axis=1)

    shN = stack(rest_names).reshape(vertex_count, 3, K).transpose(0, 2, 1)
    arrays = {
        "means": stack(["x", "y", "z"]),
        "quats": stack([f"rot_{i}" for i in range(4)]),
        "scales": stack([f"scale_{i}" for i in range(3)]),
        "opacities": np.asarray(column["opacity"], dtype=np.float32),
        "sh0": stack(["f_dc_0", "f_dc_1", "f_dc_2"]).reshape(vertex_count, 1, 3),
        "shN": shN,
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def _parse_header(blob: bytes, source: str) -> tuple[int, dict[str, str], int, str]:
    if not blob.startswith(b"ply"):
        raise PlyError(f"{source} is not a PLY file (it does not start with 'ply')")
    end = re.search(rb"end_header\r?\n", blob[:1 << 20])
    if end is None:
        raise PlyError(f"{source}: PLY header has no end_header line")
    lines = blob[: end.start()].decode("ascii", errors="replace").splitlines()
    fmt = ""
    elements: list[tuple[str, int, dict[str, str]]] = []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            try:
                elements.append((words[1], int(words[2]), {}))
            except ValueError:
                raise PlyError(f"{source}: bad element line {line!r}") from None
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2][words[-1]] = "list"
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1][2][words[2]] = _PLY_TYPES[words[1]]
            else:
                raise PlyError(f"{source}: unsupported PLY property line {line!r}")
        else:
            raise PlyError(f"{source}: unexpected PLY header line {line!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise PlyError(f"{source}: unsupported PLY format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise PlyError(f"{source}: the first PLY element must be 'vertex' (splats), found {[e[0] for e in elements]}")
    _, count, properties = elements[0]
    if "list" in properties.values():
        raise PlyError(f"{source}: list properties on vertices are not splat data")
    if count < 0:
        raise PlyError(f"{source}: negative vertex count")
    return count, properties, end.end(), fmt


def _as_numpy(splats: dict[str, Tensor], name: str) -> np.ndarray:
    if name not in splats:
        raise ValueError(f"splats has no '{name}' entry (expected means, quats, scales, opacities, sh0, shN)")
    value = splats[name]
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)
