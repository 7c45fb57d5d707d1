import json

import pytest

from im3d.config import PRESETS, Config, ConfigError, config_from_dict, load_config, parse_assignment, refine_strength


def test_standard_preset_is_the_papers_setting():
    config = load_config("standard")
    # the frame count is the orbit model's (SV3D: 21; the paper's Emu Video made 16), see diffusion/profiles.py
    assert (config.diffusion.orbit_profile, config.diffusion.num_views) == ("sv3d_p", 21)
    assert (config.recon.lpips_weight, config.recon.msssim_weight, config.recon.mask_weight) == (10.0, 0.2, 1.0)
    assert config.recon.init_points == 5000
    # The one measured departure: points start on the masks' visual hull, not in the paper's centre
    # ball (held-out splats +1-3 dB and better meshes on every benchmark object, docs/benchmarks.md).
    assert config.recon.init == "visual_hull"
    assert config.recon.densify_every == 50
    assert config.recon.steps == 1200
    assert 2 <= config.pipeline.refinement_rounds <= 3
    assert config.recon.lpips_net == "vgg"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_round_trips_through_json(preset, tmp_path):
    config = load_config(preset)
    path = tmp_path / "config.json"
    config.save(path)
    again = load_config("standard", file=path)
    assert again == config


def test_presets_differ_in_cost():
    fast, standard, high = (load_config(p) for p in ("fast", "standard", "high"))
    assert fast.recon.steps < standard.recon.steps < high.recon.steps
    assert fast.mesh.grid_resolution < standard.mesh.grid_resolution < high.mesh.grid_resolution


def test_unknown_key_names_full_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'recon\.lpips_wieght' \(did you mean 'lpips_weight'\?\)"):
        load_config(overrides={"recon": {"lpips_wieght": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'reconstruction'"):
        config_from_dict({"reconstruction": {}})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"recon": {"steps": "many"}}, r"recon\.steps: expected an integer, got str"),
        ({"recon": {"steps": 1.5}}, r"recon\.steps: expected an integer"),
        ({"recon": {"steps": True}}, r"recon\.steps: expected an integer, got bool"),
        ({"diffusion": {"enabled": 1}}, r"diffusion\.enabled: expected true or false"),
        ({"recon": {"lpips_net": "resnet"}}, r"recon\.lpips_net: 'resnet' is not one of 'vgg', 'alex'"),
        ({"recon": {"background": [1, "x", 1]}}, r"recon\.background\[1\]: expected a number"),
        ({"recon": 5}, r"recon: expected a table of settings"),
        ({"diffusion": {"refine_strengths": [0.5, 1.5]}}, r"diffusion\.refine_strengths\[1\]: must be in \(0, 1\]"),
        ({"server": {"port": 70000}}, r"server\.port: must be a TCP port"),
    ],
)
def test_wrong_types_and_ranges_are_rejected_with_key_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def test_ints_are_accepted_for_floats():
    config = load_config(overrides={"recon": {"lpips_weight": 5}})
    assert config.recon.lpips_weight == 5.0 and isinstance(config.recon.lpips_weight, float)


def test_layering_preset_file_overrides_assignments(tmp_path):
    toml = tmp_path / "studio.toml"
    toml.write_text('[recon]\nsteps = 321\nbackend = "torch"\n[mesh]\nface_budget = 9000\n')
    config = load_config(
        "fast", file=toml, overrides={"mesh": {"face_budget": 8000}}, assignments=["mesh.texture_size=256", "recon.backend=cpu"]
    )
    assert config.recon.image_size == PRESETS["fast"]["recon"]["image_size"]  # from the preset
    assert config.recon.steps == 321  # from the file
    assert config.mesh.face_budget == 8000  # overrides beat the file
    assert config.mesh.texture_size == 256 and config.recon.backend == "cpu"  # assignments come last


def test_bad_files_and_assignments(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_config(file=broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_assignment("recon.steps")
    with pytest.raises(ConfigError, match="unknown preset 'turbo'"):
        load_config("turbo")


def test_saved_json_is_complete():
    data = json.loads(Config().to_json())
    assert set(data) == {"diffusion", "recon", "mesh", "pipeline", "server"}
    assert data["recon"]["lpips_weight"] == 10.0


def test_refine_strength_repeats_the_last_value():
    config = load_config(overrides={"diffusion": {"refine_strengths": [0.6, 0.4]}})
    assert [refine_strength(config, i) for i in range(4)] == [0.6, 0.4, 0.4, 0.4]
