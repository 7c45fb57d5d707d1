"""Orbit-model profiles: the orbit model decides frames, elevation, size, steps and guidance;
what the user sets wins and is checked against what the model can do."""

from __future__ import annotations

import json

import pytest

from im3d.config import Config, ConfigError, config_from_dict, load_config
from im3d.diffusion.profiles import PROFILE_KEYS, PROFILES, detect_profile


def test_default_orbit_model_gets_sv3d_p_settings_and_records_the_profile():
    d = load_config().diffusion
    assert d.orbit_profile == "sv3d_p"
    assert (d.num_views, d.image_size, d.elevation_deg, d.orbit_steps, d.max_guidance, d.cond_aug) == (21, 576, 10.0, 50, 2.5, 1e-5)
    # the resolved config names the profile, so a saved job says which settings it ran with
    assert json.loads(load_config().to_json())["diffusion"]["orbit_profile"] == "sv3d_p"
    # Config() (no profile applied) holds the same orbit settings as the default profile
    for key, value in PROFILES["sv3d_p"].defaults.items():
        assert getattr(Config().diffusion, key) == value, key


def test_sv3d_u_profile_by_name_and_its_fixed_orbit():
    d = load_config(overrides={"diffusion": {"orbit_model": "stabilityai/sv3d_u-diffusers"}}).diffusion
    assert (d.orbit_profile, d.num_views, d.elevation_deg) == ("sv3d_u", 21, 0.0)
    with pytest.raises(ConfigError, match=r"diffusion.elevation_deg: sv3d_u supports only 0.0.*got 20"):
        load_config(overrides={"diffusion": {"orbit_profile": "sv3d_u", "elevation_deg": 20}})
    with pytest.raises(ConfigError, match="diffusion.num_views: sv3d_u"):
        load_config(assignments=["diffusion.orbit_model=sv3d_u", "diffusion.num_views=16"])
    # a saved sv3d_u config loads again unchanged (its values are the fixed ones)
    config = load_config(overrides={"diffusion": {"orbit_profile": "sv3d_u"}})
    assert load_config(overrides=config.to_dict()) == config


def test_user_settings_win_and_presets_count_as_set():
    d = load_config(assignments=["diffusion.num_views=16", "diffusion.elevation_deg=20"]).diffusion
    assert (d.orbit_profile, d.num_views, d.elevation_deg, d.orbit_steps) == ("sv3d_p", 16, 20.0, 50)
    assert load_config("fast").diffusion.orbit_steps == 15
    custom = load_config(overrides={"diffusion": {"orbit_model": "/nowhere/my-orbit-model"}}).diffusion
    assert custom.orbit_profile == "custom" and custom.num_views == Config().diffusion.num_views
    with pytest.raises(ConfigError, match="orbit_profile"):
        load_config(overrides={"diffusion": {"orbit_profile": "sv4d"}})


def test_profile_detected_from_a_converted_or_diffusers_folder(tmp_path):
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "im3d_conversion.json").write_text(json.dumps({"variant": "sv3d_u"}))
    assert detect_profile(str(converted)) == "sv3d_u"
    for width, dims, expected in ((1280, None, "sv3d_p"), (256, [256], "sv3d_u"), (768, None, "custom")):
        folder = tmp_path / f"unet{width}"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"projection_class_embeddings_input_dim": width, "addition_time_embed_dims": dims}))
        assert detect_profile(str(folder)) == expected
    (tmp_path / "org--thing" / "unet").mkdir(parents=True)
    (tmp_path / "org--thing" / "unet" / "config.json").write_text(json.dumps({"projection_class_embeddings_input_dim": 256}))
    assert detect_profile("org/thing", models_dir=str(tmp_path)) == "sv3d_u"
    assert set(PROFILES["sv3d_p"].defaults) == set(PROFILE_KEYS)


def test_resolved_configs_are_not_re_profiled():
    """config_from_dict (what the job runner uses on a saved config) takes the values as they are."""
    data = load_config().to_dict()
    data["diffusion"]["num_views"] = 12
    assert config_from_dict(data).diffusion.num_views == 12


def test_text_to_image_runs_at_the_size_it_was_trained_at():
    from im3d.diffusion.text_to_image import trained_size

    assert trained_size("stabilityai/sdxl-turbo") == 512  # SDXL's pipeline would default to 1024
    assert trained_size("/models/stabilityai--sdxl-turbo") == 512
    assert trained_size("stabilityai/stable-diffusion-3.5-medium") == 0  # its pipeline default is right
