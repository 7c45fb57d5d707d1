"""The diffusion stage with tiny random models built here, saved with `save_pretrained` and loaded
through the product's own `from_pretrained` path (resolve folder -> warm cache -> pipeline)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from im3d.config import ConfigError, load_config
from im3d.errors import Cancelled, ModelNotFoundError, PipelineError

pytest.importorskip("diffusers")

from im3d.diffusion import models
from im3d.diffusion.foreground import (
    orbit_frame_mask,
    centre_object,
    prepare_reference,
    segment_background_colour,
    soften_edges,
)
from im3d.diffusion.orbit_video import (
    OrbitUNetSpatioTemporalConditionModel,
    OrbitVideoPipeline,
    generate_orbit,
    guidance_per_frame,
    load_orbit_pipeline,
    orbit_radius,
    rediffuse,
    steps_for_strength,
)
from im3d.diffusion.text_to_image import generate_reference_image
from im3d.testing.tiny_models import build_orbit_model, build_text_to_image_model

VIEWS, SIZE, STEPS = 4, 64, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return build_orbit_model(root / "orbit"), build_text_to_image_model(root / "t2i")


@pytest.fixture(scope="session")
def config(model_dirs):
    orbit, t2i = model_dirs
    return load_config(
        overrides={
            "diffusion": {
                "orbit_model": str(orbit),
                "text_to_image_model": str(t2i),
                "num_views": VIEWS,
                "image_size": SIZE,
                "orbit_steps": STEPS,
                "text_to_image_steps": 2,
                "dtype": "float32",
            },
            "pipeline": {"device": "cpu"},
        }
    )


def object_image(size=48, background=(0.2, 0.4, 0.9)) -> torch.Tensor:
    """A red box with a hole, off-centre, on a plain background: [H, W, 3]."""
    image = torch.tensor(background).expand(size, size, 3).clone()
    image[10:30, 6:20] = torch.tensor([0.9, 0.1, 0.1])
    image[16:20, 11:14] = torch.tensor(background)  # a hole, filled by the mask
    return image


@pytest.fixture(scope="session")
def reference(config):
    return prepare_reference(object_image(), config)


@pytest.fixture(scope="session")
def orbit(config, reference):
    return generate_orbit(reference, config, seed=3)


# ----------------------------------------------------------------------------------------------
# Foreground


def test_background_colour_segmentation_finds_the_object_and_fills_holes():
    mask = segment_background_colour(object_image())
    expected = torch.zeros(48, 48, 1)
    expected[10:30, 6:20] = 1.0
    assert torch.equal(mask, expected)


def _antialiased_disc(colour, size=48, radius=13.3, samples=8) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc of `colour` on white, box-filtered from samples² per pixel: image [H, W, 3], coverage [H, W]."""
    offsets = (torch.arange(samples) + 0.5) / samples
    y = (torch.arange(size)[:, None] + offsets[None, :]).reshape(-1)
    inside = ((y[:, None] - size / 2 + 1.7) ** 2 + (y[None, :] - size / 2 - 0.6) ** 2) < radius**2
    coverage = inside.float().view(size, samples, size, samples).mean(dim=(1, 3))
    image = coverage[..., None] * torch.tensor(colour) + (1 - coverage[..., None])
    return image, coverage


def test_soft_edges_give_an_anti_aliased_outline_its_coverage():
    """The binary mask counts every pixel the object touches past the threshold: its area is too
    big and its outline ~0.4 pixel outside the true one. Soft edges give those pixels their share."""
    image, coverage = _antialiased_disc((0.2, 0.4, 0.8))
    binary = segment_background_colour(image)
    soft = soften_edges(image, binary)
    edge = (coverage > 0) & (coverage < 1)
    error = lambda mask: float((mask[..., 0] - coverage)[edge].abs().mean())  # noqa: E731
    print(f"edge error: binary {error(binary):.3f}, soft {error(soft):.3f}; area {binary.sum():.1f} / {soft.sum():.1f} / {coverage.sum():.1f}")
    assert error(soft) < 0.05 and error(binary) > 0.2
    assert abs(float(soft.sum() - coverage.sum())) < 0.01 * float(coverage.sum()) < float(binary.sum() - coverage.sum())
    assert torch.equal(soft[..., 0][~edge], binary[..., 0][~edge])  # inside and outside untouched


def test_soft_edges_leave_an_outline_that_barely_differs_from_the_background_binary():
    """Where the object's colour is within EDGE_CONTRAST of the background, its pixels' colours
    say little about their coverage (noise would decide): the edge stays binary."""
    image, _ = _antialiased_disc((0.88, 0.95, 0.95))
    binary = segment_background_colour(image)
    assert float(binary.sum()) > 0
    assert torch.equal(soften_edges(image, binary), binary)


def test_soft_edges_leave_an_edge_the_segmentation_cut_through_the_object_binary():
    """A light part of the object (within the threshold of the background) is cut off by the
    segmentation: the edge there has more object, not background, outside it. Softening it would
    widen the hole; the outline against plain background is still softened."""
    image, coverage = _antialiased_disc((0.2, 0.4, 0.8))
    light = torch.tensor([0.95, 0.95, 0.95])
    image[:, 30:] = coverage[:, 30:, None] * torch.tensor([0.2, 0.4, 0.8]) + (1 - coverage[:, 30:, None]) * light
    binary = segment_background_colour(image)
    soft = soften_edges(image, binary)
    fractional = (soft[..., 0] > 0.01) & (soft[..., 0] < 0.99)
    assert bool(fractional[:, :20].any())  # the outline against white
    assert torch.equal(soft[:, 34:], binary[:, 34:])  # the edge against the light part


def _light_and_see_through(size=48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blue and off-white halves (0.05 from white, the off-white half on the outline) of a block with
    a see-through hole, on white: image, the light half's pixels, the hole's pixels."""
    image = torch.ones(size, size, 3)
    image[8:40, 8:24] = torch.tensor([0.2, 0.4, 0.8])
    image[8:40, 24:40] = torch.tensor([0.95, 0.96, 0.95])
    image[20:28, 14:20] = 1.0  # background seen through the object
    light = torch.zeros(size, size, dtype=torch.bool)
    light[8:40, 24:40] = True
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[20:28, 14:20] = True
    return image, light, hole


def test_orbit_frame_mask_keeps_light_parts_and_see_through_holes():
    """The plain segmentation (a reference image's) drops a part within the threshold of the
    background and fills every hole; an orbit frame's keeps the part and the hole open, since the
    views' hull is cut by any frame that drops a part (docs/benchmarks.md, "Light parts")."""
    image, light, hole = _light_and_see_through()
    plain = segment_background_colour(image)[..., 0]
    frame = orbit_frame_mask(image)[..., 0]
    assert float(plain[light].mean()) < 0.1 and bool((plain[hole] == 1).all())
    assert float(frame[light].mean()) > 0.95 and float(frame[hole].max()) == 0.0
    enclosed = image.clone()  # a light patch inside the object is the object, not a hole
    enclosed[20:28, 14:20] = torch.tensor([0.96, 0.95, 0.96])
    assert bool((orbit_frame_mask(enclosed)[..., 0][hole] == 1).all())


def test_orbit_frame_mask_does_not_take_in_an_anti_aliased_fringe():
    """At the light level (0.02) every anti-aliased edge has a faint fringe; only parts over two
    pixels wide are added, so the disc's outline is the soft-edged one, not a pixel out."""
    image, coverage = _antialiased_disc((0.2, 0.4, 0.8))
    frame = orbit_frame_mask(image)
    assert torch.equal(frame, soften_edges(image, segment_background_colour(image)))
    assert abs(float(frame.sum() - coverage.sum())) < 0.01 * float(coverage.sum())


@pytest.mark.parametrize("sigma", [0.005, 0.03])
def test_orbit_frame_mask_on_a_noisy_background(sigma):
    """The light level follows the border's noise: at sigma 0.005 the light part is still found and
    no noise speck is taken for the object; at 0.03 the level passes the threshold and the mask is
    the plain segmentation's."""
    image, light, hole = _light_and_see_through()
    noisy = (image + sigma * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    frame = orbit_frame_mask(noisy)[..., 0]
    outside = torch.ones_like(light)
    outside[7:41, 7:41] = False
    assert float(frame[outside].max()) < 0.5  # no speck of noise counts as object
    if sigma < 0.01:
        assert float(frame[light].mean()) > 0.9 and float(frame[hole].max()) < 0.05  # the hole's rim: soft, noise
    else:
        assert torch.equal(frame, soften_edges(noisy, segment_background_colour(noisy))[..., 0])


def test_centre_object_centres_and_scales_to_the_fill():
    image = object_image()
    rgb, mask = centre_object(image, segment_background_colour(image), size=64, fill=0.75)
    rows = torch.nonzero(mask[..., 0].amax(1) > 0.5).flatten()
    cols = torch.nonzero(mask[..., 0].amax(0) > 0.5).flatten()
    assert int(rows[-1] - rows[0] + 1) == 48  # the longer side (20 px) -> 0.75 * 64
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 31.5) <= 1
    assert torch.allclose(rgb[0, 0], torch.ones(3)) and torch.allclose(rgb[14, 20], torch.tensor([0.9, 0.1, 0.1]))


def test_rgba_input_uses_its_alpha_and_an_empty_mask_is_a_clear_error(config):
    rgba = torch.zeros(40, 40, 4)
    rgba[5:15, 20:35] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ref = prepare_reference(rgba, config)
    assert ref.rgb.shape == (SIZE, SIZE, 3) and ref.mask.shape == (SIZE, SIZE, 1)
    assert ref.mask.sum() > 0 and torch.allclose(ref.rgb[0, 0], torch.ones(3))
    with pytest.raises(PipelineError, match="no object found") as caught:
        prepare_reference(torch.ones(32, 32, 3) * 0.5, config)
    assert caught.value.code == "no_object_found"


# ----------------------------------------------------------------------------------------------
# Missing models, loading, warm cache


@pytest.mark.timeout(20)
def test_missing_model_is_a_named_error_listing_every_place(tmp_path, config):
    (tmp_path / "no-such-model").mkdir()  # exists but is not in the diffusers layout
    bad = load_config(
        overrides={"diffusion": {"orbit_model": "nobody/no-such-model", "models_dir": str(tmp_path)}, "pipeline": {"device": "cpu"}}
    )
    with pytest.raises(ModelNotFoundError) as caught:
        generate_orbit(prepare_reference(object_image(), config), bad)
    message = str(caught.value)
    assert "'nobody/no-such-model'" in message
    assert str(tmp_path / "nobody" / "no-such-model") in message
    assert str(tmp_path / "nobody--no-such-model") in message
    assert "not the diffusers layout" in message  # <models_dir>/no-such-model
    assert str(models.hf_cache_dir()) in message
    assert "hf download nobody/no-such-model" in message and "docs/diffusion.md" in message
    assert caught.value.code == "model_not_found"

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        models.resolve_model_folder(str(tmp_path / "missing"), what="text-to-image model")


def test_models_load_once_and_stay_warm(config, model_dirs):
    first = load_orbit_pipeline(config)
    assert load_orbit_pipeline(config) is first
    assert isinstance(first.pipeline, OrbitVideoPipeline)
    assert isinstance(first.pipeline.unet, OrbitUNetSpatioTemporalConditionModel)
    assert str(model_dirs[0].resolve()) in models.loaded_models()
    index = json.loads((model_dirs[0] / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
    assert all(p.suffix != ".bin" for p in model_dirs[0].rglob("*"))  # safetensors only


# ----------------------------------------------------------------------------------------------
# The UNet's per-frame camera conditioning


def test_added_time_ids_are_per_frame(config):
    unet = load_orbit_pipeline(config).pipeline.unet
    torch.manual_seed(0)
    sample = torch.randn(1, VIEWS, 8, 16, 16)
    context = torch.randn(1, 1, 32)
    ids = torch.tensor([[1e-5, 1.4, 0.0]]).expand(VIEWS, 3)[None].clone()  # [1, F, 3]
    with torch.no_grad():
        per_frame = unet(sample, 1.0, context, ids).sample
        shared = unet(sample, 1.0, context, ids[:, 0]).sample  # [1, 3] broadcast to every frame
        ids[0, 2, 2] = 2.0  # turn one frame's camera
        turned = unet(sample, 1.0, context, ids).sample
    assert torch.allclose(per_frame, shared, atol=1e-6)
    assert not torch.allclose(turned[:, 2], per_frame[:, 2], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Text -> image -> orbit


def test_text_to_image_to_orbit_frames_with_cameras(config):
    fractions = []
    ref = generate_reference_image("a red chair", "", config, seed=1, progress=lambda f, m: fractions.append(f))
    assert ref.rgb.shape == (SIZE, SIZE, 3) and ref.mask.shape == (SIZE, SIZE, 1)
    assert ref.evaluations == 2  # 2 steps, no guidance
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    frames = generate_orbit(ref, config, seed=1)
    assert frames.images.shape == (VIEWS, SIZE, SIZE, 3) and frames.masks.shape == (VIEWS, SIZE, SIZE, 1)
    assert 0.0 <= float(frames.images.min()) and float(frames.images.max()) <= 1.0
    assert frames.evaluations == 2 * STEPS  # guided: conditional + unconditional per step
    assert frames.azimuths_deg == [0.0, 90.0, 180.0, 270.0]

    cams = frames.cameras
    assert len(cams) == VIEWS and (cams.width, cams.height) == (SIZE, SIZE)
    radius = orbit_radius(33.8, 0.85)
    centers = cams.centers()
    assert torch.allclose(centers.norm(dim=-1), torch.full((VIEWS,), radius), atol=1e-4)
    elevation = torch.rad2deg(torch.asin(centers[:, 2] / radius))
    assert torch.allclose(elevation, torch.full((VIEWS,), 10.0), atol=1e-3)
    assert centers[0, 1] < 0 and abs(float(centers[0, 0])) < 1e-4  # frame 0: the reference view, from -Y
    assert centers[1, 0] > 0  # counter-clockwise seen from +Z
    assert math.isclose(float(cams.Ks[0, 0, 0]), 0.5 * SIZE / math.tan(math.radians(33.8) / 2), rel_tol=1e-5)


def test_seeds_reproduce_and_differ(config, reference, orbit):
    again = generate_orbit(reference, config, seed=3)
    other = generate_orbit(reference, config, seed=4)
    assert torch.equal(again.images, orbit.images)
    assert (other.images - orbit.images).abs().mean() > 1e-3


# ----------------------------------------------------------------------------------------------
# Re-diffusion


def test_rediffusion_at_full_strength_ignores_the_renders(config, reference, orbit):
    from_orbit = rediffuse(orbit.images, reference, 1.0, config, seed=3)
    from_black = rediffuse(torch.zeros_like(orbit.images), reference, 1.0, config, seed=3)
    assert torch.equal(from_orbit.images, from_black.images)
    assert torch.equal(from_orbit.images, orbit.images)  # = a fresh orbit with that seed
    assert from_orbit.evaluations == 2 * STEPS


def test_rediffusion_at_small_strength_keeps_the_renders(config, reference):
    pipe = load_orbit_pipeline(config).pipeline
    torch.manual_seed(0)
    renders = torch.rand(VIEWS, 1, 1, 3) * 0.5 + 0.25 + 0.2 * torch.rand(VIEWS, SIZE, SIZE, 3)
    # What the frames become through the VAE alone (a random VAE is no identity). The temporal
    # decoder mixes neighbouring frames, so decode in the model's order (SV3D: the reference view last).
    with torch.no_grad():
        pixels = renders.roll(-1, 0).permute(0, 3, 1, 2) * 2 - 1
        latents = pipe.encode_vae(pixels, 8) * pipe.vae.config.scaling_factor
        round_trip = pipe.decode(latents[None], 8)[0].permute(0, 2, 3, 1).roll(1, 0)

    kept = rediffuse(renders, reference, 0.01, config, seed=5)
    fresh = rediffuse(renders, reference, 1.0, config, seed=5)
    assert kept.evaluations == 2 and steps_for_strength(STEPS, 0.01) == 1  # one step, guided
    # frame 0 is the reference view: replaced by the conditioning image, as Stability's sampler does
    assert torch.equal(kept.images[0], reference.rgb) and torch.equal(fresh.images[0], reference.rgb)
    kept_error = (kept.images[1:] - round_trip[1:]).abs().mean()
    assert kept_error < 0.005
    assert (fresh.images[1:] - round_trip[1:]).abs().mean() > 10 * kept_error
    half = rediffuse(renders, reference, 0.5, config, seed=5)
    assert half.evaluations == 2 * 2


def test_rediffusion_checks_its_inputs(config, reference, orbit):
    with pytest.raises(ValueError, match="num_views"):
        rediffuse(orbit.images[:3], reference, 0.5, config)
    with pytest.raises(ValueError, match="strength"):
        rediffuse(orbit.images, reference, 0.0, config)


# ----------------------------------------------------------------------------------------------
# Progress, cancel, schedule arithmetic, config


def test_cancel_between_steps_raises_cancelled(config, reference):
    messages = []

    def progress(fraction, message):
        messages.append(message)

    with pytest.raises(Cancelled):
        generate_orbit(reference, config, seed=0, progress=progress, cancel=lambda: "step 1/" in " ".join(messages))
    assert sum("step" in m for m in messages) == 1


def test_strength_schedule_and_guidance_profile():
    assert [steps_for_strength(25, s) for s in (1.0, 0.5, 0.3, 0.01)] == [25, 13, 8, 1]
    assert steps_for_strength(10, 0.3) == 3  # no float round-up: ceil(0.3 * 10) is 3
    triangle = guidance_per_frame(5, 1.0, 3.0, "triangle")
    assert torch.allclose(triangle, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    assert torch.allclose(guidance_per_frame(3, 1.0, 2.0, "linear"), torch.tensor([1.0, 1.5, 2.0]))


def test_new_diffusion_settings_are_range_checked():
    for key, value in [("frame_fill", 0.0), ("orbit_fov_deg", 170.0), ("text_to_image_size", 100), ("cond_aug", -1.0)]:
        with pytest.raises(ConfigError, match=f"diffusion.{key}"):
            load_config(overrides={"diffusion": {key: value}})


@pytest.mark.parametrize("shape,size", [((2, 3, 64, 48), (32, 32)), ((1, 3, 20, 20), (40, 30)), ((1, 3, 224, 224), (224, 224))])
def test_own_antialiased_resize_matches_diffusers(shape, size):
    """`resize_antialiased` is ours; diffusers' private SVD helper (same preprocessing) is the oracle."""
    svd = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")
    from im3d.diffusion.orbit_video import resize_antialiased

    images = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(resize_antialiased(images, size), svd._resize_with_antialiasing(images, size), rtol=1e-5, atol=1e-5)
