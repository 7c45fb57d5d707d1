"""Refine conditions the diffusion on the object's front view (azimuth 0, camera on -Y).

The pipeline writes reference.png before the fit; cancelling as the fit starts keeps this test to
the reference choice alone (no models, no fitting).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from im3d.cameras import orbit_cameras, read_transforms, write_transforms
from im3d.config import load_config
from im3d.diffusion import prepare_reference
from im3d.errors import Cancelled
from im3d.pipeline import run_job, save_png
from im3d.request import JobInputs


def striped_views(root, size=32, views=6, start=60.0):
    """One flat colour per view (view i is pure colour i), the front view (azimuth 0) not listed first."""
    cams = orbit_cameras(views, elevation_deg=10.0, radius=2.5, fov_deg=40.0, width=size, azimuth_start_deg=start)
    names = []
    for i in range(views):
        rgba = torch.zeros(size, size, 4)
        rgba[8:24, 8:24, :3] = torch.tensor([i / views, 1.0 - i / views, 0.5])
        rgba[8:24, 8:24, 3] = 1.0
        names.append(f"images/{i}.png")
        save_png(root / names[-1], rgba)
    write_transforms(root / "transforms.json", cams, names)
    return root


def test_refine_reference_is_the_front_view(tmp_path):
    views = striped_views(tmp_path / "views")
    dataset = read_transforms(views)
    azimuths = torch.rad2deg(torch.atan2(dataset.cameras.centers()[:, 0], -dataset.cameras.centers()[:, 1]))
    front = int(torch.argmin(azimuths.abs()))
    assert abs(float(azimuths[front])) < 1e-3 and front == 5  # azimuths 60, 120, ..., 300, 360
    config = load_config("fast", overrides={"pipeline": {"device": "cpu"}, "diffusion": {"image_size": 64}, "recon": {"lpips_weight": 0.0, "l1_weight": 1.0}})
    seen = []
    with pytest.raises(Cancelled):
        run_job(JobInputs("refine", "a box", views=views), tmp_path / "job", config,
                lambda stage, fraction, message, preview: seen.append(stage), cancel=lambda: "fit" in seen)
    written = np.asarray(Image.open(tmp_path / "job" / "reference.png"), dtype=np.float32) / 255.0
    rgba = torch.cat([dataset.composited([1.0, 1.0, 1.0])[front], dataset.masks[front]], dim=-1)
    expected = prepare_reference(rgba, config)
    assert np.abs(written[..., :3] - expected.rgb.numpy()).max() < 2 / 255
    # ... and no other view's colour.
    for other in range(len(dataset.cameras)):
        if other != front:
            colour = dataset.images[other][16, 16]
            assert np.abs(written[32, 32, :3] - colour.numpy()).max() > 0.05
