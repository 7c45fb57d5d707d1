"""The fitting loop: reaches a PSNR floor on a small scene, recovers from NaN once, cancels."""

from __future__ import annotations

import math

import pytest
import torch

from im3d.config import ReconConfig
from im3d.errors import Cancelled
from im3d.splats.fit import FitDivergedError, SplatFitter
from im3d.splats.losses import MissingWeightsError, load_lpips, msssim_settings
from im3d.splats.model import sh_degree_of
from im3d.testing.synthetic import splat_ball_views


def _ground_truth(num_views=8, size=64, seed=0):
    """A small coloured object made of Gaussians, rendered from an orbit: a scene with a known answer."""
    return splat_ball_views(num_views, size, count=300, radius=0.35, scale=0.06, opacity=0.9, seed=seed)


def _config(**kw):
    base = dict(
        image_size=64, steps=150, init_points=400, lpips_weight=0.0, l1_weight=1.0, msssim_weight=0.2,
        mask_weight=1.0, densify_start=50, densify_every=50, background=[0.0, 0.0, 0.0], backend="cpu",
    )
    base.update(kw)
    return ReconConfig(**base)


@pytest.mark.parametrize("init", ["center", "visual_hull"])
def test_small_fit_reaches_psnr_floor(init):
    cams, images, masks = _ground_truth(num_views=6, size=48)
    # The centre ball starts from the paper's big overlapping blobs; the hull from small ones on its shell.
    scale = {"center": 0.05, "visual_hull": 0.015}[init]
    fitter = SplatFitter(_config(init=init, init_scale=scale, image_size=48), cams, images, masks)
    before = fitter.evaluate(cams, images, masks)
    result = fitter.fit(100)
    after = fitter.evaluate(cams, images, masks)
    assert result.steps == 100 and math.isfinite(result.final_loss)
    assert after["psnr"] > before["psnr"] + 3
    assert after["psnr"] > 16.0, after
    assert after["mask_iou"] > 0.8, after


def test_fit_continues_on_new_targets():
    cams, images, masks = _ground_truth(num_views=4, size=32)
    fitter = SplatFitter(_config(image_size=32), cams, images, masks)
    fitter.fit(60)
    tinted = (images * torch.tensor([1.0, 0.6, 0.6])).clamp(0, 1)
    fitter.set_targets(tinted, masks)
    fitter.fit(60)
    colors, alphas = fitter.render(cams)
    red, green = colors[..., 0][alphas[..., 0] > 0.5].mean(), colors[..., 1][alphas[..., 0] > 0.5].mean()
    assert fitter.global_step == 120
    assert red > green  # the colours followed the new targets


def test_nan_rolls_back_once_then_fails_with_step():
    cams, images, masks = _ground_truth(num_views=4, size=32)
    fitter = SplatFitter(_config(image_size=32, init_points=100), cams, images, masks)
    fitter.fit(10)
    lr_before = fitter.optimizers["means"].param_groups[0]["lr"]
    with torch.no_grad():
        fitter.splats["means"][0, 0] = float("nan")
    fitter.fit(5)  # recovers: rolled back to the last good state, learning rates halved
    assert fitter.rollbacks == 1
    assert torch.isfinite(fitter.splats["means"]).all()
    assert fitter.lr_factor == 0.5
    with torch.no_grad():
        fitter.splats["opacities"][3] = float("inf")
    with pytest.raises(FitDivergedError, match=r"NaN/Inf again at step \d+"):
        fitter.fit(5)
    assert lr_before > 0


def test_cancel_stops_within_one_step():
    cams, images, masks = _ground_truth(num_views=4, size=32)
    fitter = SplatFitter(_config(image_size=32, init_points=100), cams, images, masks)
    seen = []
    with pytest.raises(Cancelled):
        fitter.fit(100, on_step=lambda info: seen.append(info.step), cancel=lambda: len(seen) >= 3)
    assert seen == [1, 2, 3]


def test_views_per_step_and_budget():
    cams, images, masks = _ground_truth(num_views=8, size=32)
    fitter = SplatFitter(_config(image_size=32, init_points=200, max_gaussians=250, views_per_step=2, densify_start=10, densify_every=10, densify_grad_threshold=1e-7), cams, images, masks)
    fitter.fit(40)
    assert fitter.num_gaussians <= 250


def test_sh_degree_one_fits():
    cams, images, masks = _ground_truth(num_views=4, size=32)
    fitter = SplatFitter(_config(image_size=32, init_points=100, sh_degree=1), cams, images, masks)
    fitter.fit(20)
    assert sh_degree_of(fitter.splats) == 1


def test_msssim_settings_adapt_to_small_images():
    assert msssim_settings(256, 256) == (11, pytest.approx([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], abs=1e-3))
    win, weights = msssim_settings(64, 64)
    assert (win - 1) * 2 ** (len(weights) - 1) < 64 and abs(sum(weights) - 1) < 1e-6
    win, weights = msssim_settings(8, 8)
    assert win >= 3 and len(weights) >= 1
    with pytest.raises(ValueError, match="too small"):
        msssim_settings(2, 2)


def test_lpips_backbone_loads_from_torch_hub_cache(tmp_path, monkeypatch):
    """The real loading path: a (random) AlexNet checkpoint in <TORCH_HOME>/hub/checkpoints."""
    import torchvision

    previous_hub = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth.*looked for at .*hub/checkpoints"):
            load_lpips("alex")
        net = torchvision.models.alexnet()
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
        model = load_lpips("alex")
        assert torch.equal(model.net.slice1[0].weight, net.features[0].weight)
        x = torch.rand(1, 3, 32, 32)
        assert float(model(x, x, normalize=True).sum()) == pytest.approx(0.0, abs=1e-6)
        assert float(model(x, torch.rand(1, 3, 32, 32), normalize=True).sum()) > 0
    finally:
        torch.hub.set_dir(previous_hub)
