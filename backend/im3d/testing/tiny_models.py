"""Randomly initialised models in the real classes, for tests and benchmarks.

`build_orbit_model(folder, "tiny" | "sv3d")` and `build_text_to_image_model(folder)` write a
diffusers-layout folder (`save_pretrained(safe_serialization=True)`) that the product then loads
through the same `from_pretrained` path as real weights. "sv3d" has SV3D_p's full-size
architecture (about 1.5 B UNet parameters) with random weights, for timing and memory only.
Random weights draw random pictures: these folders test plumbing, shapes and numerics, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from im3d.diffusion.convert_sv3d import SVD_SCHEDULER

ORBIT_CONFIGS = {
    "tiny": {
        "unet": {
            "sample_size": 16,
            "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            "block_out_channels": (32, 64),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 40,
            "addition_time_embed_dims": (8, 16, 16),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "num_attention_heads": (2, 4),
            "num_frames": 4,
        },
        # scaling_factor as SD's 0.18215: brings this random encoder's latents to about unit variance
        "vae": {
            "block_out_channels": (32, 32, 32),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "layers_per_block": 1,
            "scaling_factor": 5.0,
        },
        "clip": {
            "hidden_size": 32,
            "projection_dim": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
    },
    # SV3D_p (Stability's sv3d_p.yaml): SVD's UNet, 1280-wide vector conditioning, 21 frames at 576².
    "sv3d": {
        "unet": {
            "sample_size": 72,
            "block_out_channels": (320, 640, 1280, 1280),
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 1280,
            "addition_time_embed_dims": (256, 512, 512),
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "num_attention_heads": (5, 10, 20, 20),
            "num_frames": 21,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "layers_per_block": 2,
        },
        "clip": {  # OpenCLIP ViT-H/14
            "hidden_size": 1280,
            "projection_dim": 1024,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
        },
    },
}


def build_orbit_pipeline(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """An `OrbitVideoPipeline` with random weights in the `size` architecture."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from im3d.diffusion.orbit_video import (
        OrbitUNetSpatioTemporalConditionModel,
        OrbitVideoPipeline,
    )

    spec = ORBIT_CONFIGS[size]
    torch.manual_seed(seed)
    unet = OrbitUNetSpatioTemporalConditionModel(**spec["unet"])
    vae = AutoencoderKLTemporalDecoder(latent_channels=4, **spec["vae"])
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["clip"]))
    side = spec["clip"]["image_size"]
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    pipe = OrbitVideoPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_orbit_model(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    folder = Path(folder)
    build_orbit_pipeline(size, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def _write_tiny_clip_tokenizer(folder: Path, max_length: int) -> None:
    """A character-level CLIP BPE vocabulary (no merges): builds offline, tokenizes any ASCII prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))


def build_text_to_image_model(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random `StableDiffusionPipeline` (64² images) in the diffusers layout."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=2 + 2 * 94,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer_folder = folder / "_tokenizer_src"
    _write_tiny_clip_tokenizer(tokenizer_folder, max_length=128)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for path in sorted(tokenizer_folder.iterdir()):
        path.unlink()
    tokenizer_folder.rmdir()
    return folder


# ----------------------------------------------------------------------------------------------
# Stability-style single-file sgm checkpoints (what `convert_sv3d_checkpoint` reads)

_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors_streaming(path: str | Path, items: list[tuple[str, tuple[int, ...], torch.dtype]], tensor_of) -> Path:
    """Write a .safetensors file one tensor at a time: `tensor_of(name)` is called in `items` order,
    so a multi-GB checkpoint is written with about one tensor in memory."""
    import math

    path = Path(path)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in items:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for name, shape, dtype in items:
            tensor = tensor_of(name).to(dtype).contiguous()
            assert tuple(tensor.shape) == tuple(shape), (name, tensor.shape, shape)
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy())  # raw little-endian bytes, no copy
    return path


def sgm_state_from_pipeline(pipe, plan) -> dict[str, torch.Tensor]:
    """Invert a conversion plan: an `OrbitVideoPipeline`'s weights under the sgm checkpoint's names.

    Tensors the converter ignores (the conditioner autoencoder's decoder, OpenCLIP's text-side
    leftovers) get small random stand-ins of the right names, so the file is shaped like Stability's.
    """
    modules = {"unet": pipe.unet, "vae": pipe.vae, "image_encoder": pipe.image_encoder}
    state: dict[str, torch.Tensor] = {}
    for component in plan.components:
        weights = modules[component.name].state_dict()
        fused: dict[str, list] = {}
        for entry in component.entries:
            tensor = weights[entry.target].detach().cpu()
            if entry.op == "linear_from_conv":
                tensor = tensor[:, :, None, None]
            elif entry.op == "transpose":
                tensor = tensor.t().contiguous()
            elif entry.op.startswith("chunk3:"):
                fused.setdefault(entry.source, [None] * 3)[int(entry.op[7:])] = tensor
                continue
            state[entry.source] = tensor
        for source, parts in fused.items():
            state[source] = torch.cat(parts, dim=0)
    generator = torch.Generator().manual_seed(0)
    for name in plan.ignored:
        shape = (4, 4) if name.endswith("weight") else (4,)
        state[name] = torch.randn(shape, generator=generator)
    return state


def sv3d_scaled_pipeline(full_shapes: dict[str, tuple[int, ...]], seed: int = 0, time_id_dims=None):
    """(pipeline, plan): SV3D's architecture (same levels, blocks and layers as the full-size
    checkpoint whose names and shapes are `full_shapes`) at small widths, random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from im3d.diffusion.convert_sv3d import OPENCLIP_MEAN, OPENCLIP_STD, plan_sv3d_conversion
    from im3d.diffusion.orbit_video import OrbitUNetSpatioTemporalConditionModel, OrbitVideoPipeline

    full = plan_sv3d_conversion(full_shapes, time_id_dims=time_id_dims)
    configs = {c.name: dict(c.config) for c in full.components}
    unet, vae, clip = configs["unet"], configs["vae"], configs["image_encoder"]
    # 32-channel steps (GroupNorm's 32 groups) that keep where the full model changes width
    unet_widths = tuple(32 * (1 + i) for i in _width_ranks(unet["block_out_channels"]))
    unet.update(block_out_channels=unet_widths, cross_attention_dim=32, num_attention_heads=tuple(c // 16 for c in unet_widths),
                sample_size=8, num_frames=4)  # fmt: skip
    vae.update(block_out_channels=tuple(32 * (1 + i) for i in _width_ranks(vae["block_out_channels"])), sample_size=64)
    clip.update(hidden_size=64, intermediate_size=256, num_attention_heads=4, projection_dim=32, image_size=56, patch_size=14)
    torch.manual_seed(seed)
    pipe = OrbitVideoPipeline(
        vae=AutoencoderKL(**vae),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**clip)),
        unet=OrbitUNetSpatioTemporalConditionModel(**unet),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                             image_mean=OPENCLIP_MEAN, image_std=OPENCLIP_STD),
    )  # fmt: skip
    return pipe, full


def _width_ranks(widths) -> list[int]:
    """(320, 640, 1280, 1280) -> [0, 1, 2, 2]: the rank of each level's width among the distinct ones."""
    distinct = sorted(set(widths))
    return [distinct.index(w) for w in widths]


def write_sgm_checkpoint(path: str | Path, full_shapes: dict[str, tuple[int, ...]], size: str = "tiny", seed: int = 0,
                         dtype: torch.dtype = torch.float32, time_id_dims=None):  # fmt: skip
    """A Stability-style `sv3d_*.safetensors` with random weights.

    `size="tiny"`: SV3D's architecture at small widths (returns (path, pipeline) so a test can
    compare what the converter makes with the weights written); `size="full"`: exactly the names
    and shapes in `full_shapes` (a manifest of the real checkpoint), N(0, 0.02) values streamed
    one tensor at a time (returns (path, None)).
    """
    if size == "full":
        generator = torch.Generator().manual_seed(seed)
        items = [(name, tuple(shape), dtype) for name, shape in sorted(full_shapes.items())]
        return write_safetensors_streaming(
            path, items, lambda name: torch.empty(full_shapes[name]).normal_(0.0, 0.02, generator=generator)
        ), None
    from im3d.diffusion.convert_sv3d import plan_sv3d_conversion

    pipe, _ = sv3d_scaled_pipeline(full_shapes, seed, time_id_dims)
    # the plan of the scaled architecture: names are the full-size ones, shapes the small model's
    scaled = plan_sv3d_conversion({n: tuple(s) for n, s in _scaled_shapes(pipe, full_shapes, time_id_dims).items()},
                                  unet_head_dim=16, clip_head_dim=16, time_id_dims=time_id_dims)  # fmt: skip
    state = sgm_state_from_pipeline(pipe, scaled)
    items = [(name, tuple(t.shape), dtype) for name, t in sorted(state.items())]
    return write_safetensors_streaming(path, items, state.__getitem__), pipe


def _scaled_shapes(pipe, full_shapes, time_id_dims) -> dict[str, tuple[int, ...]]:
    """sgm names -> the small pipeline's shapes, through the full-size plan's entries."""
    from im3d.diffusion.convert_sv3d import plan_sv3d_conversion

    full = plan_sv3d_conversion(full_shapes, time_id_dims=time_id_dims)
    return {name: tuple(t.shape) for name, t in sgm_state_from_pipeline(pipe, full).items()}
