"""NaN rollback: the learning rates the optimisers actually step with are halved after a rollback.

A planted bug kept the old position learning rate after a rollback (the per-step annealing rewrote
it from a value computed before the rollback) and the suite did not notice: these tests read the
learning rate of every optimiser at every step, through `on_step`, and compare it with the schedule.
"""

from __future__ import annotations

import torch

from im3d.cameras import orbit_cameras
from im3d.config import ReconConfig
from im3d.splats.fit import SplatFitter

STEPS = 12
POISON_AT = 5  # NaN planted into a position after this step


def make_fitter():
    g = torch.Generator().manual_seed(0)
    cams = orbit_cameras(3, elevation_deg=15, radius=2.0, fov_deg=40, width=24)
    yy, xx = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="ij")
    disc = (((xx - 12) ** 2 + (yy - 12) ** 2) < 36).float()[None, :, :, None].expand(3, 24, 24, 1).contiguous()
    images = torch.rand(3, 24, 24, 3, generator=g) * disc
    config = ReconConfig(
        image_size=24, init_points=60, lpips_weight=0.0, msssim_weight=0.0, l1_weight=1.0, mask_weight=1.0,
        densify_start=1000, densify_every=4, backend="torch", background=[0.0, 0.0, 0.0],
    )
    return SplatFitter(config, cams, images, disc)


def record_lrs(fitter, poison_at=None):
    """on_step callback: the learning rate each optimiser used in the step just taken."""
    seen: list[dict[str, float]] = []

    def on_step(info):
        seen.append({name: opt.param_groups[0]["lr"] for name, opt in fitter.optimizers.items()})
        if poison_at is not None and info.step == poison_at:
            with torch.no_grad():
                fitter.splats["means"][0, 0] = float("nan")

    return seen, on_step


def means_schedule(fitter, factor: float) -> list[float]:
    """Positions anneal from lr_means * scene_scale to 1 % over the call (step s uses 0.01 ** (s / steps))."""
    base = fitter.config.lr_means * fitter.scene_scale * factor
    return [base * 0.01 ** (s / STEPS) for s in range(STEPS)]


def test_learning_rates_follow_the_schedule_without_rollback():
    fitter = make_fitter()
    seen, on_step = record_lrs(fitter)
    fitter.fit(STEPS, on_step=on_step)
    assert fitter.rollbacks == 0
    for got, want in zip([s["means"] for s in seen], means_schedule(fitter, 1.0)):
        assert abs(got - want) <= 1e-12 * want
    assert {s["scales"] for s in seen} == {fitter.config.lr_scales}


def test_rollback_halves_every_learning_rate_the_optimisers_use():
    fitter = make_fitter()
    seen, on_step = record_lrs(fitter, poison_at=POISON_AT)
    result = fitter.fit(STEPS, on_step=on_step)
    assert result.rollbacks == 1 and fitter.lr_factor == 0.5
    assert torch.isfinite(fitter.splats["means"]).all()
    c = fitter.config
    # Steps 1..POISON_AT ran before the NaN; the rollback restored the start-of-call snapshot (the
    # last one taken), so the call went on from there with every rate halved.
    before, after = seen[:POISON_AT], seen[POISON_AT:]
    assert len(after) >= STEPS - POISON_AT
    full, half = means_schedule(fitter, 1.0), means_schedule(fitter, 0.5)
    for index, rates in enumerate(before):
        assert abs(rates["means"] - full[index]) <= 1e-12 * full[index]
    for rates, step in zip(after, range(POISON_AT, STEPS)):
        assert abs(rates["means"] - half[step]) <= 1e-12 * half[step], (step, rates["means"], half[step])
    for rates in after:
        assert rates["scales"] == c.lr_scales / 2 and rates["quats"] == c.lr_quats / 2
        assert rates["opacities"] == c.lr_opacities / 2 and rates["sh0"] == c.lr_colors / 2


def test_rollback_rate_persists_into_the_next_fit_call():
    fitter = make_fitter()
    seen, on_step = record_lrs(fitter, poison_at=2)
    fitter.fit(STEPS, on_step=on_step)
    seen2, on_step2 = record_lrs(fitter)
    fitter.fit(STEPS, on_step=on_step2)
    assert abs(seen2[0]["means"] - means_schedule(fitter, 0.5)[0]) <= 1e-12 * seen2[0]["means"]
    assert seen2[-1]["opacities"] == fitter.config.lr_opacities / 2


def test_targets_are_composited_over_the_configured_background():
    """The fit compares renders over `recon.background` with targets over the same colour."""
    fitter = make_fitter()
    images = torch.rand(3, 24, 24, 3)
    masks = torch.zeros(3, 24, 24, 1)
    masks[:, 6:18, 6:18] = 1.0
    fitter.config.background = [0.2, 0.4, 0.6]
    fitter.background = torch.tensor(fitter.config.background)
    fitter.set_targets(images, masks)
    outside = fitter.targets[:, 0, 0]
    assert torch.allclose(outside, torch.tensor([0.2, 0.4, 0.6]).expand(3, 3))
    assert torch.allclose(fitter.targets[:, 10, 10], images[:, 10, 10])
