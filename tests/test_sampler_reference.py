"""OrbitVideoPipeline samples as Stability's SV3D sampler does.

The reference is the sampler of sv3d_{p,u}.yaml written out from its definition in sgm
(EDMDiscretization sigma_min 0.002, sigma_max 700, rho 7; EulerEDMSampler without churn;
Denoiser with VScalingWithEDMcNoise: c_skip = 1/(s²+1), c_out = -s/sqrt(s²+1),
c_in = 1/sqrt(s²+1), c_noise = log(s)/4; TrianglePredictionGuider on the denoised halves; the
initial noise scaled by sqrt(1 + s0²)), driven by the same UNet and conditioning. Our pipeline
goes through diffusers' EulerDiscreteScheduler with SVD's scheduler config instead.
"""

from __future__ import annotations

import math

import pytest
import torch

from im3d.diffusion.orbit_video import guidance_per_frame
from im3d.testing.tiny_models import build_orbit_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sgm_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def test_orbit_pipeline_matches_the_sgm_edm_euler_sampler():
    pipe = build_orbit_pipeline("tiny")
    frames, steps, cond_aug, low, high = 4, 4, 1e-5, 1.0, 2.5
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    elevations, azimuths = [10.0] * frames, pipe.model_azimuths_deg(frames)
    ours = pipe(image, elevations, azimuths, num_inference_steps=steps, min_guidance_scale=low, max_guidance_scale=high,
                cond_aug=cond_aug, generator=torch.Generator().manual_seed(0), output_type="latent").frames  # fmt: skip

    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)  # the same draws, in the same order, as the pipeline
        embedding = pipe.encode_clip(image)  # [1, 1, D]
        pixels = image * 2 - 1
        pixels = pixels + cond_aug * torch.randn(pixels.shape, generator=generator)
        latent = pipe.encode_vae(pixels, 8)[:, None].repeat(1, frames, 1, 1, 1)  # unscaled, as sgm's concat
        h = 64 // pipe.vae_scale_factor
        noise = torch.randn((1, frames, 4, h, h), generator=generator)
        ids = pipe.camera_time_ids(torch.tensor(elevations), torch.tensor(azimuths), cond_aug)[None]
        c = {"crossattn": torch.cat([torch.zeros_like(embedding), embedding]), "concat": torch.cat([torch.zeros_like(latent), latent]),
             "vector": torch.cat([ids, ids])}  # fmt: skip  (uc zeroes crossattn and concat, keeps the vector)
        scale = guidance_per_frame(frames, low, high, "triangle")[None, :, None, None, None]
        # sgm's TrianglePredictionGuider: 2|v/p - floor(v/p + 1/2)| over linspace(0, 1, F), p = 1
        v = torch.linspace(0, 1, frames)
        assert torch.allclose(scale.flatten(), low + (high - low) * 2 * (v - torch.floor(v + 0.5)).abs())

        sigmas = sgm_sigmas(steps)
        x = noise.double() * math.sqrt(1.0 + sigmas[0] ** 2)
        for i in range(steps):
            s = sigmas[i]
            c_skip, c_out, c_in, c_noise = 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5, 1 / (s**2 + 1) ** 0.5, 0.25 * torch.log(s)
            x2 = torch.cat([x, x])
            inp = torch.cat([(x2 * c_in).float(), c["concat"]], dim=2)
            out = pipe.unet(inp, c_noise.float(), encoder_hidden_states=c["crossattn"], added_time_ids=c["vector"]).sample
            denoised = out.double() * c_out + x2 * c_skip
            uncond, cond = denoised.chunk(2)
            denoised = uncond + scale.double() * (cond - uncond)
            x = x + (x - denoised) / s * (sigmas[i + 1] - s)  # Euler step of dx/ds = (x - D(x)) / s

    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours.double(), x, atol=2e-3, rtol=2e-3)
