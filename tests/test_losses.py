"""IM-3D's reconstruction loss (paper §3.2): every term is present and counts with its weight.

A planted bug that dropped the mask term passed the whole suite; these tests pin each term to an
independent formula and each weight to its effect on the total. LPIPS runs with the `lpips`
package's shipped linear heads on a randomly initialised AlexNet backbone (`pnet_rand=True`), so
no weights are downloaded; the loss only needs *a* perceptual network to check the plumbing.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from im3d.cameras import orbit_cameras
from im3d.config import ReconConfig
from im3d.splats.losses import LossWeights, ReconstructionLoss, mask_iou, ms_ssim, psnr

TERMS = ("lpips", "msssim", "mask", "l1", "l2")


@pytest.fixture(scope="module")
def lpips_net():
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    colors = torch.rand(2, 40, 40, 3, generator=g)
    targets = (colors + 0.3 * torch.rand(2, 40, 40, 3, generator=g)).clamp(0, 1)
    alphas = torch.rand(2, 40, 40, 1, generator=g)
    masks = (torch.rand(2, 40, 40, 1, generator=g) > 0.5).float()
    return colors, alphas, targets, masks


def reference_terms(lpips_net, colors, alphas, targets, masks) -> dict[str, float]:
    """Each term written out independently of ReconstructionLoss."""
    x, y = colors.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
    return {
        "lpips": float(lpips_net(x * 2 - 1, y * 2 - 1).mean()),  # lpips wants [-1, 1]
        "msssim": 1.0 - float(ms_ssim(colors, targets)),
        "mask": float(((alphas - masks) ** 2).mean()),
        "l1": float((colors - targets).abs().mean()),
        "l2": float(((colors - targets) ** 2).mean()),
    }


def only(term: str, weight: float) -> LossWeights:
    return LossWeights(**{name: (weight if name == term else 0.0) for name in TERMS})


def test_paper_weights_are_the_defaults():
    assert LossWeights() == LossWeights(lpips=10.0, msssim=0.2, mask=1.0, l1=0.0, l2=0.0)
    config = ReconConfig()
    assert (config.lpips_weight, config.msssim_weight, config.mask_weight, config.l1_weight, config.l2_weight) == (10.0, 0.2, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("term", TERMS)
def test_each_term_alone_is_its_formula_times_its_weight(term, lpips_net, batch):
    expected = reference_terms(lpips_net, *batch)[term]
    assert expected > 1e-4, "the test images must make every term non-zero"
    for weight in (1.0, 3.5):
        loss = ReconstructionLoss(only(term, weight), lpips_net if term == "lpips" else None)
        total, terms = loss(*batch)
        assert set(terms) == {term}
        assert terms[term] == pytest.approx(expected, rel=1e-5)
        assert float(total) == pytest.approx(weight * expected, rel=1e-5)


def test_all_terms_together_sum_with_their_weights(lpips_net, batch):
    weights = LossWeights(lpips=10.0, msssim=0.2, mask=1.0, l1=0.7, l2=0.3)
    reference = reference_terms(lpips_net, *batch)
    total, terms = ReconstructionLoss(weights, lpips_net)(*batch)
    assert set(terms) == set(TERMS)
    expected = sum(getattr(weights, name) * reference[name] for name in TERMS)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    # Raising one weight by 1 raises the total by exactly that term's value.
    for name in TERMS:
        bumped = LossWeights(**{n: getattr(weights, n) + (1.0 if n == name else 0.0) for n in TERMS})
        bumped_total, _ = ReconstructionLoss(bumped, lpips_net)(*batch)
        assert float(bumped_total) - float(total) == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


def test_mask_term_is_in_the_paper_loss_and_drives_alpha(lpips_net, batch):
    colors, alphas, _, masks = batch
    # Perfect colours, wrong silhouette: only the mask term can see the difference.
    total, terms = ReconstructionLoss(LossWeights(), lpips_net)(colors, alphas, colors, masks)
    assert terms["lpips"] == pytest.approx(0.0, abs=1e-6) and terms["msssim"] == pytest.approx(0.0, abs=1e-5)
    assert float(total) == pytest.approx(float(((alphas - masks) ** 2).mean()), rel=1e-4)
    alphas = alphas.clone().requires_grad_(True)
    total, _ = ReconstructionLoss(LossWeights(), lpips_net)(colors, alphas, colors, masks)
    total.backward()
    expected_grad = 2 * (alphas.detach() - masks) / alphas.numel()
    assert torch.allclose(alphas.grad, expected_grad, atol=1e-7)


def test_perfect_fit_costs_nothing_and_the_loss_has_gradients(lpips_net, batch):
    colors, alphas, targets, masks = batch
    weights = LossWeights(lpips=10.0, msssim=0.2, mask=1.0, l1=1.0, l2=1.0)
    total, _ = ReconstructionLoss(weights, lpips_net)(targets, masks, targets, masks)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    colors = colors.clone().requires_grad_(True)
    total, _ = ReconstructionLoss(weights, lpips_net)(colors, alphas, targets, masks)
    total.backward()
    assert colors.grad is not None and float(colors.grad.abs().sum()) > 0


def test_weights_are_checked():
    with pytest.raises(ValueError, match="LPIPS model is needed"):
        ReconstructionLoss(LossWeights(lpips=1.0))
    with pytest.raises(ValueError, match="all loss weights are zero"):
        x = torch.rand(1, 8, 8, 3)
        a = torch.rand(1, 8, 8, 1)
        ReconstructionLoss(LossWeights(0, 0, 0, 0, 0))(x, a, x, a)


def test_ms_ssim_matches_pytorch_msssim_on_full_size_images():
    """Our small-image MS-SSIM is pytorch-msssim's standard five-scale one where that fits."""
    from pytorch_msssim import ms_ssim as reference

    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 176, 176, 3, generator=g)
    b = (a + 0.2 * torch.rand(1, 176, 176, 3, generator=g)).clamp(0, 1)
    ours = float(ms_ssim(a, b))
    theirs = float(reference(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), data_range=1.0))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert float(ms_ssim(a, a)) == pytest.approx(1.0, abs=1e-5)


def test_metrics_have_their_textbook_values():
    x = torch.zeros(1, 4, 4, 3)
    y = torch.full((1, 4, 4, 3), 0.1)
    assert float(psnr(x, y)) == pytest.approx(20.0, rel=1e-5)  # -10 log10(0.01)
    a = torch.zeros(1, 4, 4, 1)
    m = torch.zeros(1, 4, 4, 1)
    a[0, :2] = 1.0  # 8 pixels
    m[0, 1:3] = 1.0  # 8 pixels, 4 shared
    assert float(mask_iou(a, m)) == pytest.approx(4 / 12)


def test_fitter_builds_its_loss_from_the_config(lpips_net):
    from im3d.splats.fit import SplatFitter

    cams = orbit_cameras(2, radius=2.0, fov_deg=40.0, width=40)  # AlexNet needs about 32 px or more
    images, masks = torch.rand(2, 40, 40, 3), torch.ones(2, 40, 40, 1)
    config = ReconConfig(image_size=40, init_points=20, lpips_weight=7.0, msssim_weight=0.3, mask_weight=2.0, l1_weight=0.4, l2_weight=0.6, backend="torch")
    fitter = SplatFitter(config, cams, images, masks, lpips_model=lpips_net)
    assert fitter.loss_fn.weights == LossWeights(lpips=7.0, msssim=0.3, mask=2.0, l1=0.4, l2=0.6)
    assert fitter.loss_fn.lpips_model is lpips_net
    assert math.isfinite(fitter.fit(1).final_loss)
