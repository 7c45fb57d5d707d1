"""The SV3D converter: Stability's sgm checkpoints -> the OrbitVideoPipeline folder.

- the real sv3d_p / sv3d_u name-and-shape manifest (tests/fixtures/sv3d_manifest.json.gz, made by
  instantiating Stability's own sgm code on the meta device; its "how" field says so) converts
  with nothing unmapped, missing, unexpected or mis-shaped;
- OpenCLIP (open-clip-torch) vs the converted CLIPVisionModelWithProjection, preprocessing included
  (sgm resizes with kornia), and the VAE against diffusers' own LDM conversion helper;
- a small random checkpoint in SV3D's architecture converts, verifies, loads and samples, with the
  weights bit-identical to the ones written; clear errors for pickles, truncation, non-SV3D files;
  cancel leaves nothing behind.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from im3d.diffusion.convert_sv3d import (
    CLIP_PREFIX,
    ConvertError,
    convert_sv3d_checkpoint,
    plan_clip,
    plan_sv3d_conversion,
    plan_vae,
    read_safetensors_header,
    verify_pipeline_folder,
)
from im3d.errors import Cancelled

MANIFEST = Path(__file__).parent / "fixtures" / "sv3d_manifest.json.gz"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def manifest(variant: str) -> dict[str, tuple[int, ...]]:
    data = json.loads(gzip.open(MANIFEST).read())
    return {name: tuple(shape) for name, shape in data["checkpoints"][variant].items()}


# ----------------------------------------------------------------------------------------------
# (a) full size, names and shapes only


@pytest.mark.parametrize("variant", ["sv3d_p", "sv3d_u"])
def test_real_manifest_converts_without_leftovers(variant):
    shapes = manifest(variant)
    assert len(shapes) > 2000
    assert "Stability-AI/generative-models" in json.loads(gzip.open(MANIFEST).read())["how"]
    plan = plan_sv3d_conversion(shapes)
    assert plan.variant == variant
    assert plan.unmapped(shapes) == []
    assert plan.problems(shapes) == []  # every target exists in the meta-built model with the same shape
    unet = next(c for c in plan.components if c.name == "unet").config
    assert unet["block_out_channels"] == (320, 640, 1280, 1280) and unet["num_attention_heads"] == (5, 10, 20, 20)
    assert unet["addition_time_embed_dims"] == ((256, 512, 512) if variant == "sv3d_p" else (256,))
    clip = next(c for c in plan.components if c.name == "image_encoder").config
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"], clip["projection_dim"]) == (1280, 32, 16, 1024)
    # every checkpoint tensor is used exactly once, except the deliberately ignored ones
    sources = [e.source for c in plan.components for e in c.entries]
    assert len(set(sources)) + len(plan.ignored) == len(shapes)
    assert all(name.startswith(("conditioner.embedders.1.encoder.decoder.", "conditioner.embedders.1.encoder.post_quant_conv.",
                                CLIP_PREFIX)) for name in plan.ignored)  # fmt: skip
    targets = [e.target for c in plan.components for e in c.entries]
    assert len(targets) == len(set(targets))


def test_manifest_with_a_missing_or_misshaped_tensor_is_refused():
    shapes = manifest("sv3d_p")
    broken = dict(shapes)
    del broken["model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    plan = plan_sv3d_conversion(broken)
    assert any("attn2.to_k.weight" in p for p in plan.problems(broken))
    bad = dict(shapes)
    bad["first_stage_model.decoder.mid.attn_1.q.weight"] = (512, 256, 1, 1)
    plan = plan_sv3d_conversion(bad)
    assert any("mid_block.attentions.0.to_q.weight" in p for p in plan.problems(bad))


# ----------------------------------------------------------------------------------------------
# (b) numerical equivalence against third-party implementations


def test_openclip_tower_and_preprocessing_match_the_converted_clip():
    import kornia
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from im3d.diffusion.orbit_video import OrbitVideoPipeline

    torch.manual_seed(0)
    oc = CLIP(32, CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=14, image_size=224),
              CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)).eval()  # fmt: skip
    del oc.transformer  # as sgm's FrozenOpenCLIPImageEmbedder
    with torch.no_grad():  # random init leaves some parameters at 0/1: make every tensor informative
        for p in oc.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {CLIP_PREFIX + k: v for k, v in oc.state_dict().items()}
    plan, ignored = plan_clip({k: tuple(v.shape) for k, v in state.items()}, head_dim=None)
    assert plan.config["num_attention_heads"] == 2 and all(n.startswith(CLIP_PREFIX) for n in ignored)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**plan.config))
    converted = {e.target: e.apply(state[e.source]) for e in plan.entries}
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)
    model.eval()

    image = torch.rand(2, 3, 576, 576, dtype=torch.float64).float()  # [0, 1], SV3D's input size
    with torch.no_grad():
        # sgm: FrozenOpenCLIPImageEmbedder.preprocess on [-1, 1] input, then the OpenCLIP tower
        x = kornia.geometry.resize(image * 2 - 1, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
        x = kornia.enhance.normalize((x + 1.0) / 2.0, torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD))
        reference = oc.encode_image(x)  # [2, 32]
        pipe = SimpleNamespace(image_encoder=model, feature_extractor=SimpleNamespace(
            image_mean=list(open_clip.OPENAI_DATASET_MEAN), image_std=list(open_clip.OPENAI_DATASET_STD)))  # fmt: skip
        ours = OrbitVideoPipeline.encode_clip(pipe, image)[:, 0]
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_vae_mapping_matches_diffusers_ldm_helper():
    """Our encoder/decoder names and 1x1-conv reshapes equal diffusers' own LDM VAE conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    shapes = manifest("sv3d_p")
    plan, _ = plan_vae(shapes)
    generator = torch.Generator().manual_seed(0)
    source = {e.source: torch.randn(shapes[e.source], generator=generator) for e in plan.entries}
    # the same autoencoder as one LDM state dict: conditioner encoder + first-stage decoder
    ldm = {}
    for name, tensor in source.items():
        for prefix in ("conditioner.embedders.1.encoder.", "first_stage_model."):
            if name.startswith(prefix):
                ldm["first_stage_model." + name[len(prefix) :]] = tensor
    theirs = convert_ldm_vae_checkpoint(ldm, dict(plan.config))
    ours = {e.target: e.apply(source[e.source]) for e in plan.entries}
    assert set(ours) == set(theirs)  # neither has post_quant_conv: SV3D decodes the latent directly
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name


# ----------------------------------------------------------------------------------------------
# (c) a small random checkpoint in SV3D's architecture, end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from im3d.testing.tiny_models import write_sgm_checkpoint

    folder = tmp_path_factory.mktemp("sgm")
    path, pipe = write_sgm_checkpoint(folder / "sv3d_p.safetensors", manifest("sv3d_p"))
    return path, pipe


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    seen = []
    out = convert_sv3d_checkpoint(tiny_checkpoint[0], root / "sv3d_p", progress=lambda f, m: seen.append(f),
                                  unet_head_dim=16, clip_head_dim=16, max_shard_bytes=8 * 2**20)  # fmt: skip
    return out, seen


def test_tiny_checkpoint_converts_loads_and_samples(tiny_checkpoint, converted):
    from im3d.diffusion.orbit_video import OrbitVideoPipeline

    out, seen = converted
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert sorted(p.name for p in out.parent.iterdir()) == ["sv3d_p"]  # no temporary folder left
    assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded at 8 MiB
    assert verify_pipeline_folder(out) == []
    record = json.loads((out / "im3d_conversion.json").read_text())
    assert record["variant"] == "sv3d_p" and record["time_id_dims"] == [256, 512, 512]

    pipe = OrbitVideoPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe.vae).__name__ == "AutoencoderKL" and not pipe.vae.config.use_post_quant_conv
    original = tiny_checkpoint[1]
    for name in ("unet", "vae", "image_encoder"):  # the weights written under sgm names come back bit for bit
        a, b = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    frames = pipe(image, elevations_deg=[10.0] * 2, azimuths_deg=pipe.model_azimuths_deg(2), num_inference_steps=2,
                  max_guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    assert frames.shape == (1, 2, 3, 64, 64) and torch.isfinite(frames).all() and frames.std() > 0


def test_verify_names_what_is_wrong(converted, tmp_path):
    import shutil

    out = shutil.copytree(converted[0], tmp_path / "m")
    (out / "image_encoder" / "model.safetensors").unlink()
    config = json.loads((out / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    (out / "vae" / "config.json").write_text(json.dumps(config))
    shutil.rmtree(out / "scheduler")
    problems = verify_pipeline_folder(out)
    assert any(p.startswith("image_encoder: no model.safetensors") for p in problems)
    assert any(p.startswith("vae:") and "quant_conv.weight" in p for p in problems)
    assert any(p.startswith("scheduler:") for p in problems)
    assert verify_pipeline_folder(tmp_path) == [f"{tmp_path}: no model_index.json (not a diffusers-layout folder)"]


def test_cancel_and_existing_output_leave_nothing_behind(tiny_checkpoint, tmp_path):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 50

    with pytest.raises(Cancelled):
        convert_sv3d_checkpoint(tiny_checkpoint[0], tmp_path / "m", cancel=cancel, unet_head_dim=16, clip_head_dim=16)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m").mkdir()
    with pytest.raises(ConvertError) as error:
        convert_sv3d_checkpoint(tiny_checkpoint[0], tmp_path / "m", unet_head_dim=16, clip_head_dim=16)
    assert error.value.code == "output_exists"


def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    path = tiny_checkpoint[0]
    pickle = tmp_path / "sv3d_p.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(ConvertError, match="pickle") as error:
        convert_sv3d_checkpoint(pickle, tmp_path / "a")
    assert error.value.code == "invalid_checkpoint"
    renamed = tmp_path / "renamed.safetensors"  # a pickle whatever its name says
    renamed.write_bytes(pickle.read_bytes())
    with pytest.raises(ConvertError, match="pickle"):
        read_safetensors_header(renamed)

    truncated = tmp_path / "truncated.safetensors"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="truncated.*download it again"):
        convert_sv3d_checkpoint(truncated, tmp_path / "b")

    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(other))
    with pytest.raises(ConvertError, match="not SV3D"):
        convert_sv3d_checkpoint(other, tmp_path / "c")
    text_model = tmp_path / "text.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, str(text_model))
    with pytest.raises(ConvertError, match="not an sgm SV3D checkpoint"):
        convert_sv3d_checkpoint(text_model, tmp_path / "d")
    header_only = tmp_path / "garbage.safetensors"
    header_only.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ConvertError, match="not a safetensors file"):
        read_safetensors_header(header_only)
    with pytest.raises(ConvertError) as error:
        convert_sv3d_checkpoint(tmp_path / "missing.safetensors", tmp_path / "e")
    assert error.value.code == "checkpoint_not_found"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_converted_sv3d_u_loads_without_camera_ids(tmp_path):
    """SV3D_u: a 256-wide vector (cond_aug only); the folder loads and is told no camera."""
    from im3d.diffusion.orbit_video import OrbitVideoPipeline
    from im3d.diffusion.profiles import detect_profile
    from im3d.testing.tiny_models import write_sgm_checkpoint

    path, _ = write_sgm_checkpoint(tmp_path / "sv3d_u.safetensors", manifest("sv3d_u"))
    out = convert_sv3d_checkpoint(path, tmp_path / "sv3d_u", unet_head_dim=16, clip_head_dim=16)
    assert detect_profile(str(out)) == "sv3d_u"
    pipe = OrbitVideoPipeline.from_pretrained(out)
    assert pipe.unet.time_id_dims == (256,)
    ids = pipe.camera_time_ids(torch.zeros(21), torch.arange(21.0) * 360 / 21, 1e-5)
    assert ids.shape == (21, 1) and torch.all(ids == 1e-5)


def test_stock_svd_folder_loads_and_samples(tmp_path):
    """A stock Stable Video Diffusion folder (diffusers' own UNet class and config, no
    addition_time_embed_dims, temporal VAE decoder) loads and gets SVD's (fps, motion, cond_aug) ids."""
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    from im3d.diffusion.orbit_video import OrbitVideoPipeline
    from im3d.testing.tiny_models import ORBIT_CONFIGS, build_orbit_pipeline

    tiny = build_orbit_pipeline("tiny")
    unet_config = {k: v for k, v in ORBIT_CONFIGS["tiny"]["unet"].items() if k != "addition_time_embed_dims"}
    unet_config["projection_class_embeddings_input_dim"] = 3 * unet_config["addition_time_embed_dim"]
    torch.manual_seed(0)
    svd = StableVideoDiffusionPipeline(vae=tiny.vae, image_encoder=tiny.image_encoder, unet=UNetSpatioTemporalConditionModel(**unet_config),
                                       scheduler=tiny.scheduler, feature_extractor=tiny.feature_extractor)  # fmt: skip
    svd.save_pretrained(tmp_path / "svd", safe_serialization=True)
    pipe = OrbitVideoPipeline.from_pretrained(tmp_path / "svd", local_files_only=True)
    assert pipe.unet.time_id_dims == (8, 8, 8) and type(pipe.vae).__name__ == "AutoencoderKLTemporalDecoder"
    ids = pipe.camera_time_ids(torch.full((4,), 10.0), torch.tensor([90.0, 180.0, 270.0, 0.0]), 0.02)
    torch.testing.assert_close(ids, torch.tensor([[6.0, 127.0, 0.02]] * 4))
    frames = pipe(torch.rand(1, 3, 64, 64), elevations_deg=[10.0] * 2, azimuths_deg=[180.0, 0.0], num_inference_steps=1,
                  max_guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    assert frames.shape == (1, 2, 3, 64, 64) and torch.isfinite(frames).all()
