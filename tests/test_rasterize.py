"""Rasterizer backends: brute force vs every backend, gradients, dispatch, DefaultStrategy.

The brute-force renderer below is written from gsplat's CUDA kernels independently of
`im3d.splats`: float64 numpy, every pixel evaluates every projected Gaussian in depth order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from im3d.cameras import orbit_cameras
from im3d.splats.raster import RasterizerError, pick_backend, rasterize

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199


# ----------------------------------------------------------------------------- brute force


def _quat_to_rotmat(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def brute_force(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                backgrounds=None, render_mode="RGB", near=0.01, far=1e10, eps2d=0.3):  # fmt: skip
    """Per-pixel loop over depth-sorted Gaussians; returns colors [C,H,W,D], alphas [C,H,W,1]."""
    a = lambda t: t.detach().double().numpy()  # noqa: E731
    means, quats, scales, opacities, colors, viewmats, Ks = map(a, (means, quats, scales, opacities, colors, viewmats, Ks))
    C = len(viewmats)
    D = 3 + (render_mode == "RGB+ED")
    out = np.zeros((C, height, width, D))
    out_alpha = np.zeros((C, height, width, 1))
    for c in range(C):
        R, t = viewmats[c, :3, :3], viewmats[c, :3, 3]
        fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
        campos = -R.T @ t
        splats = []
        for g in range(len(means)):
            x, y, z = R @ means[g] + t
            if z < near or z > far or opacities[g] < 1 / 255:
                continue
            M = _quat_to_rotmat(quats[g]) * scales[g][None, :]
            cov = R @ M @ M.T @ R.T
            # gsplat clamps the Jacobian's x/z, y/z to 1.3x the field of view.
            lim_x = (width - cx) / fx + 0.3 * 0.5 * width / fx, cx / fx + 0.3 * 0.5 * width / fx
            lim_y = (height - cy) / fy + 0.3 * 0.5 * height / fy, cy / fy + 0.3 * 0.5 * height / fy
            tx = z * min(lim_x[0], max(-lim_x[1], x / z))
            ty = z * min(lim_y[0], max(-lim_y[1], y / z))
            J = np.array([[fx / z, 0, -fx * tx / z**2], [0, fy / z, -fy * ty / z**2]])
            cov2d = J @ cov @ J.T + eps2d * np.eye(2)
            det = np.linalg.det(cov2d)
            if det <= 0:
                continue
            mean2d = np.array([fx * x / z + cx, fy * y / z + cy])
            extend = min(3.33, math.sqrt(2 * math.log(opacities[g] * 255)))
            rx, ry = math.ceil(extend * math.sqrt(cov2d[0, 0])), math.ceil(extend * math.sqrt(cov2d[1, 1]))
            if mean2d[0] + rx <= 0 or mean2d[0] - rx >= width or mean2d[1] + ry <= 0 or mean2d[1] - ry >= height:
                continue
            if sh_degree is None:
                rgb = colors[g]
            else:
                d = means[g] - campos
                d = d / np.linalg.norm(d)
                rgb = SH_C0 * colors[g, 0]
                if sh_degree >= 1:
                    rgb = rgb + SH_C1 * (-d[1] * colors[g, 1] + d[2] * colors[g, 2] - d[0] * colors[g, 3])
                rgb = np.maximum(rgb + 0.5, 0.0)
            feat = np.concatenate([rgb, [z]]) if render_mode == "RGB+ED" else rgb
            splats.append((z, g, mean2d, np.linalg.inv(cov2d), opacities[g], feat))
        splats.sort(key=lambda s: (s[0], s[1]))
        for py in range(height):
            for px in range(width):
                T, acc = 1.0, np.zeros(D)
                for _, _, mean2d, conic, opacity, feat in splats:
                    delta = mean2d - (px + 0.5, py + 0.5)
                    sigma = 0.5 * delta @ conic @ delta
                    alpha = min(0.999, opacity * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        break
                    acc += feat * alpha * T
                    T *= 1 - alpha
                if backgrounds is not None:
                    acc[:3] += T * a(backgrounds)[c]
                if render_mode == "RGB+ED":
                    acc[3] /= max(1 - T, 1e-10)
                out[c, py, px] = acc
                out_alpha[c, py, px, 0] = 1 - T
    return out, out_alpha


# ----------------------------------------------------------------------------- scenes


def make_scene(seed, n=24, views=2, width=37, height=21, sh_degree=1, dtype=torch.float32):
    """Random splats around the origin plus hard cases: one behind the camera, one far off-screen,
    big ones straddling tile borders, a faint one below the alpha threshold."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * 0.35
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.12 + 0.02
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    cams = orbit_cameras(views, elevation_deg=15.0, radius=2.5, fov_deg=40.0, width=width, height=height)
    viewmats, Ks = cams.viewmats.to(dtype), cams.Ks.to(dtype)
    campos = torch.linalg.inv(viewmats[0])[:3, 3]
    means[0] = campos * 1.3  # behind camera 0
    means[1] = torch.tensor([0.0, 0.0, 5.0], dtype=dtype)  # far above: off-screen
    scales[2:5] = 0.35  # large: overlap tile borders
    opacities[5] = 0.002  # culled by the alpha threshold
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g, dtype=dtype)
    else:
        colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g, dtype=dtype) * 0.4
    backgrounds = torch.rand(views, 3, generator=g, dtype=dtype)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=sh_degree), backgrounds  # fmt: skip


CPU_BACKENDS = ["torch", "cpu"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "seed,sh_degree,render_mode,with_bg,size",
    [
        (0, None, "RGB", False, (12, 10)),
        (1, 0, "RGB", True, (37, 21)),
        (2, 1, "RGB+ED", True, (37, 21)),
        (3, 1, "RGB+ED", False, (33, 17)),
    ],
)
def test_matches_brute_force(backend, seed, sh_degree, render_mode, with_bg, size):
    scene, bg = make_scene(seed, width=size[0], height=size[1], sh_degree=sh_degree)
    backgrounds = bg if with_bg else None
    colors, alphas, info = rasterize(**scene, backgrounds=backgrounds, render_mode=render_mode, backend=backend)
    expected, expected_alphas = brute_force(**scene, backgrounds=backgrounds, render_mode=render_mode)
    assert colors.shape == expected.shape and alphas.shape == expected_alphas.shape
    assert expected_alphas.max() > 0.5, "the scene should cover part of the image"
    np.testing.assert_allclose(alphas.numpy(), expected_alphas, atol=1e-4, rtol=0)
    np.testing.assert_allclose(colors[..., :3].numpy(), expected[..., :3], atol=1e-4, rtol=0)
    if render_mode == "RGB+ED":
        # Expected depth divides by alpha: compare where the pixel is not nearly empty.
        covered = expected_alphas[..., 0] > 0.05
        np.testing.assert_allclose(colors[..., 3].numpy()[covered], expected[..., 3][covered], rtol=1e-4, atol=1e-4)
    radii = info["radii"]
    assert radii.dtype == torch.int32 and radii.shape == (len(scene["viewmats"]), len(scene["means"]), 2)
    assert (radii[0, 0] == 0).all(), "the Gaussian behind camera 0 must be culled"
    assert (radii[:, 1] == 0).all(), "the off-screen Gaussian must be culled"
    assert (radii[:, 5] == 0).all(), "the Gaussian below the alpha threshold must be culled"


def test_torch_reference_gradients_match_finite_differences():
    # Six Gaussians: behind the camera, off-screen, three large ones, one below the alpha threshold.
    scene, bg = make_scene(7, n=6, views=1, width=12, height=10, sh_degree=1, dtype=torch.float64)
    inputs = [scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")]
    bg = bg.clone().requires_grad_(True)

    def render(means, quats, scales, opacities, colors, backgrounds):
        s = dict(scene, means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)
        out, alphas, _ = rasterize(**s, backgrounds=backgrounds, render_mode="RGB+ED", backend="torch")
        return out, alphas

    assert torch.autograd.gradcheck(render, (*inputs, bg), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def _gradients(scene, backgrounds, render_mode, backend, weights):
    params = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    bg = backgrounds.clone().requires_grad_(True) if backgrounds is not None else None
    colors, alphas, info = rasterize(**dict(scene, **params), backgrounds=bg, render_mode=render_mode, backend=backend)
    info["means2d"].retain_grad()
    w_colors, w_alphas = weights
    loss = (colors * w_colors[..., : colors.shape[-1]]).sum() + (alphas * w_alphas).sum()
    loss.backward()
    grads = {k: p.grad for k, p in params.items()}
    grads["means2d"] = info["means2d"].grad
    if bg is not None:
        grads["backgrounds"] = bg.grad
    return grads


@pytest.mark.parametrize(
    "sh_degree,render_mode,with_bg",
    [(0, "RGB", True), (1, "RGB", False), (1, "RGB+ED", True), (None, "RGB+ED", False)],
)
def test_cpu_gradients_match_reference(sh_degree, render_mode, with_bg):
    scene, bg = make_scene(11, n=40, views=3, width=45, height=35, sh_degree=sh_degree)
    backgrounds = bg if with_bg else None
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(3, 35, 45, 4, generator=g), torch.randn(3, 35, 45, 1, generator=g))
    ref = _gradients(scene, backgrounds, render_mode, "torch", weights)
    fast = _gradients(scene, backgrounds, render_mode, "cpu", weights)
    assert ref.keys() == fast.keys()
    for name, expected in ref.items():
        assert expected.abs().sum() > 0, f"reference gradient of {name} is all zero: the scene tests nothing"
        rel = (fast[name] - expected).norm() / expected.norm()
        assert rel < 1e-3, f"{name}: relative gradient error {rel:.2e}"
    visible = (ref["means2d"] != 0).any(-1)
    assert visible.any() and not visible.all(), "culled Gaussians must get no 2D-mean gradient"


def test_auto_picks_cpu_and_gsplat_on_cpu_is_refused():
    assert pick_backend("cpu", "auto") == "cpu"
    assert pick_backend(torch.device("cpu"), "torch") == "torch"
    assert pick_backend("meta", "auto") == "torch"  # any non-CPU, non-CUDA device gets the reference
    scene, _ = make_scene(0, n=8, views=1, width=12, height=10)
    *_, info = rasterize(**scene)
    assert info["backend"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RasterizerError, match="backend='gsplat' needs CUDA"):
            rasterize(**scene, backend="gsplat")
    with pytest.raises(RasterizerError, match="unknown rasterizer backend"):
        pick_backend("cpu", "vulkan")
    with pytest.raises(RasterizerError, match="backend='cpu' needs CPU tensors"):
        pick_backend("meta", "cpu")


def test_bad_inputs_name_the_argument():
    scene, _ = make_scene(0, n=8, views=1, width=12, height=10)
    with pytest.raises(RasterizerError, match="quats must be"):
        rasterize(**dict(scene, quats=scene["quats"][:, :3]))
    with pytest.raises(RasterizerError, match="sh_degree=2"):
        rasterize(**dict(scene, sh_degree=2))
    with pytest.raises(RasterizerError, match="backgrounds must be"):
        rasterize(**scene, backgrounds=torch.zeros(2, 3))
    with pytest.raises(RasterizerError, match="render_mode"):
        rasterize(**scene, render_mode="D")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_strategy_accumulates_with_info(backend):
    from gsplat.strategy import DefaultStrategy

    scene, bg = make_scene(3, n=30, views=2, width=40, height=30, sh_degree=None)
    params = torch.nn.ParameterDict(
        {
            "means": scene["means"].clone(),
            "quats": scene["quats"].clone(),
            "scales": scene["scales"].log(),
            "opacities": torch.logit(scene["opacities"]),
            "colors": scene["colors"].clone(),
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(refine_start_iter=1000, verbose=False)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    colors, alphas, info = rasterize(
        params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]),
        params["colors"], scene["viewmats"], scene["Ks"], scene["width"], scene["height"], backend=backend,
    )  # fmt: skip
    strategy.step_pre_backward(params, optimizers, state, step=0, info=info)
    loss = (colors - 0.5).square().mean() + alphas.mean()
    loss.backward()
    strategy.step_post_backward(params, optimizers, state, step=0, info=info)
    visible = (info["radii"] > 0).all(-1).any(0)  # [N] seen by at least one camera
    assert state["count"].shape == (30,)
    assert torch.equal(state["count"] > 0, visible)
    assert (state["grad2d"][visible] > 0).all() and (state["grad2d"][~visible] == 0).all()
    expected_count = (info["radii"] > 0).all(-1).sum(0).float()
    assert torch.equal(state["count"], expected_count)


def test_checkpointed_tiles_give_the_same_gradients(monkeypatch):
    from im3d.splats.raster import torch_ref

    scene, bg = make_scene(12, n=20, views=2, width=20, height=18, sh_degree=1)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(2, 18, 20, 4, generator=g), torch.randn(2, 18, 20, 1, generator=g))
    stored = _gradients(scene, bg, "RGB+ED", "torch", weights)
    monkeypatch.setattr(torch_ref, "CHECKPOINT_MIN_PAIRS", 0)  # recompute every tile in backward
    recomputed = _gradients(scene, bg, "RGB+ED", "torch", weights)
    for name, expected in stored.items():
        torch.testing.assert_close(recomputed[name], expected, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
def test_gsplat_matches_reference_on_cuda():
    scene, bg = make_scene(4, n=60, views=3, width=64, height=48, sh_degree=1)
    cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in scene.items()}
    weights = (torch.randn(3, 48, 64, 4), torch.randn(3, 48, 64, 1))
    for render_mode in ("RGB", "RGB+ED"):
        ref_colors, ref_alphas, ref_info = rasterize(**scene, backgrounds=bg, render_mode=render_mode, backend="torch")
        colors, alphas, info = rasterize(**cuda, backgrounds=bg.cuda(), render_mode=render_mode, backend="auto")
        radii, ref_radii = info["radii"].cpu(), ref_info["radii"]
        assert torch.equal(radii > 0, ref_radii > 0)
        assert (radii - ref_radii).abs().max() <= 1  # ceil() of float32 vs float32 on another device
        torch.testing.assert_close(alphas.cpu(), ref_alphas, atol=1e-4, rtol=0)
        torch.testing.assert_close(colors[..., :3].cpu(), ref_colors[..., :3], atol=1e-4, rtol=0)
        if render_mode == "RGB+ED":
            covered = ref_alphas[..., 0] > 0.05
            torch.testing.assert_close(colors[..., 3].cpu()[covered], ref_colors[..., 3][covered], atol=1e-4, rtol=1e-4)
        ref = _gradients(scene, bg, render_mode, "torch", weights)
        fast = _gradients(cuda, bg.cuda(), render_mode, "gsplat", tuple(w.cuda() for w in weights))
        for name, expected in ref.items():
            rel = (fast[name].cpu() - expected).norm() / expected.norm()
            assert rel < 1e-3, f"{name}: relative gradient error {rel:.2e}"


def test_raster_package_has_no_import_cycle():
    """Each module of `im3d.splats.raster` imports only the modules listed before it."""
    import ast
    from pathlib import Path

    import im3d.splats.raster as raster

    order = ["common", "project", "cpu", "torch_ref", "cuda_gsplat", "frontend"]
    folder = Path(raster.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(order)
    for i, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("im3d.splats.raster")
        }
        assert imported <= set(order[:i]), f"{name}.py imports {sorted(imported - set(order[:i]))}"


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_own_sh_bases_and_covariances_match_gsplats(degree):
    """`project.py` has its own SH bases and covariances; gsplat's (private) torch ones are the oracle."""
    oracle = pytest.importorskip("gsplat.cuda._torch_impl")
    from im3d.splats.raster.project import quat_scale_to_covar, sh_bases

    g = torch.Generator().manual_seed(degree)
    dirs = torch.nn.functional.normalize(torch.randn(64, 3, generator=g, dtype=torch.float64), dim=-1)
    expected = oracle._eval_sh_bases_fast((degree + 1) ** 2, dirs)
    torch.testing.assert_close(sh_bases(degree, dirs), expected, rtol=1e-12, atol=1e-12)
    quats, scales = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.rand(64, 3, generator=g, dtype=torch.float64)
    covars, _ = oracle._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    torch.testing.assert_close(quat_scale_to_covar(quats, scales), covars, rtol=1e-12, atol=1e-12)
