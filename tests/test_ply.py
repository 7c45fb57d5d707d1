"""Splat PLY I/O in the standard 3DGS layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from im3d.splats.ply import PlyError, read_ply, splat_property_names, write_ply


def random_splats(N: int = 50, sh_degree: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    K = (sh_degree + 1) ** 2 - 1
    return {
        "means": torch.randn(N, 3, generator=g),
        "quats": torch.randn(N, 4, generator=g),
        "scales": torch.randn(N, 3, generator=g) - 4,
        "opacities": torch.randn(N, generator=g),
        "sh0": torch.randn(N, 1, 3, generator=g),
        "shN": torch.randn(N, K, 3, generator=g),
    }


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_round_trip_is_exact(tmp_path, sh_degree):
    splats = random_splats(sh_degree=sh_degree)
    write_ply(tmp_path / "s.ply", splats)
    back = read_ply(tmp_path / "s.ply")
    assert set(back) == set(splats)
    for name, value in splats.items():
        assert back[name].shape == value.shape, name
        assert torch.equal(back[name], value), name


def test_layout_is_the_3dgs_one(tmp_path):
    splats = random_splats(N=3, sh_degree=1)
    # Parameters wrapped as nn.Parameters (as the fitting loop holds them) are written the same.
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in splats.items()})
    write_ply(tmp_path / "s.ply", params)
    blob = (tmp_path / "s.ply").read_bytes()
    header, _, body = blob.partition(b"end_header\n")
    lines = header.decode().splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    assert "element vertex 3" in lines
    names = [line.split()[2] for line in lines if line.startswith("property float ")]
    assert names == splat_property_names(3)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    table = np.frombuffer(body, dtype="<f4").reshape(3, len(names))
    column = {n: table[:, i] for i, n in enumerate(names)}
    # f_rest is channel-major: the K red coefficients first (3DGS transposes [N,K,3] -> [N,3,K]).
    np.testing.assert_array_equal(column["f_rest_1"], splats["shN"][:, 1, 0].numpy())
    np.testing.assert_array_equal(column["f_rest_3"], splats["shN"][:, 0, 1].numpy())
    np.testing.assert_array_equal(column["rot_0"], splats["quats"][:, 0].numpy())  # w first
    np.testing.assert_array_equal(column["opacity"], splats["opacities"].numpy())  # logit, as stored


def test_ascii_ply_with_extra_properties_is_read(tmp_path):
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3", "red"]  # fmt: skip
    header = "ply\nformat ascii 1.0\nelement vertex 2\n" + "".join(f"property float {n}\n" for n in names) + "end_header\n"
    rows = "\n".join(" ".join(str(float(i + j)) for j in range(len(names))) for i in range(2))
    (tmp_path / "a.ply").write_text(header + rows + "\n")
    splats = read_ply(tmp_path / "a.ply")
    assert splats["means"].tolist() == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    assert splats["quats"][1].tolist() == [11.0, 12.0, 13.0, 14.0]
    assert splats["shN"].shape == (2, 0, 3)


def test_foreign_ply_names_what_is_missing(tmp_path):
    mesh_ply = (
        b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
        b"property float z\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
        + np.zeros(9, "<f4").tobytes() + b"\x03" + np.arange(3, dtype="<i4").tobytes()
    )
    (tmp_path / "mesh.ply").write_bytes(mesh_ply)
    with pytest.raises(PlyError, match="not 3D Gaussian splats.*f_dc_0.*rot_3"):
        read_ply(tmp_path / "mesh.ply")


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"PK\x03\x04" + b[4:], "not a PLY file"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b.replace(b"end_header\n", b"end_hdr\n"), "no end_header"),
        (lambda b: b.replace(b"binary_little_endian", b"binary_middle_endian"), "unsupported PLY format"),
        (lambda b: b.replace(b"property float f_rest_0\n", b""), "f_rest"),
    ],
)
def test_malformed_ply_gives_a_clear_error(tmp_path, mangle, message):
    write_ply(tmp_path / "s.ply", random_splats(N=4, sh_degree=1))
    (tmp_path / "bad.ply").write_bytes(mangle((tmp_path / "s.ply").read_bytes()))
    with pytest.raises(PlyError, match=message):
        read_ply(tmp_path / "bad.ply")


def test_missing_file_and_bad_shapes(tmp_path):
    with pytest.raises(PlyError, match="cannot read"):
        read_ply(tmp_path / "nope.ply")
    splats = random_splats(N=4)
    splats["quats"] = splats["quats"][:, :3]
    with pytest.raises(ValueError, match="quats"):
        write_ply(tmp_path / "s.ply", splats)
    assert not (tmp_path / "s.ply").exists()
