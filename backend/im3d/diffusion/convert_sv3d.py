"""Stability's single-file SV3D checkpoints -> the diffusers-layout folder `OrbitVideoPipeline` loads.

    convert_sv3d_checkpoint(src, out_dir, progress=None, cancel=None) -> Path
    verify_pipeline_folder(folder) -> list[str]          (empty: every component is complete)
    plan_sv3d_conversion(shapes) -> ConversionPlan       (names, shapes and configs only; no weights)

`sv3d_p.safetensors` / `sv3d_u.safetensors` are `sgm` `DiffusionEngine` state dicts (Stability's
generative-models, `scripts/sampling/configs/sv3d_{p,u}.yaml`):

    model.diffusion_model.*                      VideoUNet            -> unet/   OrbitUNetSpatioTemporalConditionModel
    conditioner.embedders.0.open_clip.model.*    OpenCLIP ViT-H/14    -> image_encoder/ CLIPVisionModelWithProjection
    conditioner.embedders.1.encoder.*            AutoencoderKL (enc)  \\
    first_stage_model.decoder.*                  image Decoder        /-> vae/   AutoencoderKL (no post_quant_conv)

SV3D's first stage has an identity encoder and a plain image decoder applied straight to the
latent (`AutoencodingEngine`: no `post_quant_conv`); its encoder is the conditioner's
`AutoencoderKLModeOnly` (encoder + `quant_conv`). So the VAE is diffusers' `AutoencoderKL` with
`use_post_quant_conv=False`, encoder half from the conditioner, decoder from the first stage. The
conditioner's own decoder and `post_quant_conv` and OpenCLIP's text-side leftovers (`del
model.transformer` keeps the token embedding, `ln_final`, ...) are never run by SV3D's sampler
and are not converted; they are listed as ignored.

The architecture comes from tensor shapes (channels, levels, blocks, attention placement, widths,
depths), so a scaled-down checkpoint of the same architecture converts as well. What shapes cannot
tell is an argument: attention head widths (`unet_head_dim` 64 as sgm's `num_head_channels`;
`clip_head_dim`, ViT-H: 80) and the widths of the per-frame vector conditioning (`time_id_dims`),
which follow from the vector width: 1280 = SV3D_p's (cond_aug 256, polar 512, azimuth 512), 256 =
SV3D_u's (cond_aug 256).

Streaming: tensors are read one at a time from the safetensors file (`safe_open`) and written
in shards of at most `max_shard_bytes`, so peak memory is about one shard, not the 9 GB file. The
folder is assembled under a temporary name beside `out_dir` and renamed at the end: a cancelled,
failed or killed conversion never leaves something that looks like a model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from im3d.errors import STORAGE_ERRNOS, Im3dError, check_cancel, storage_error

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model."
ENCODER_PREFIX = "conditioner.embedders.1.encoder."
DECODER_PREFIX = "first_stage_model."

# Vector-conditioning width -> (variant, widths of its sinusoidal embeddings), sv3d_{p,u}.yaml.
SV3D_VECTOR_LAYOUTS = {1280: ("sv3d_p", (256, 512, 512)), 256: ("sv3d_u", (256,))}
SGM_SCALE_FACTOR = 0.18215  # sv3d_{p,u}.yaml model.params.scale_factor
OPENCLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # sgm FrozenOpenCLIPImageEmbedder.mean
OPENCLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class ConvertError(Im3dError):
    """The checkpoint cannot be converted; `code` says why, the message what to do."""


def _invalid(message: str) -> ConvertError:
    return ConvertError("invalid_checkpoint", message)


# ----------------------------------------------------------------------------------------------
# Reading safetensors headers (no weights)


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a .safetensors file, checked for truncation.

    Raises `ConvertError` with code `invalid_checkpoint` for a pickle checkpoint, a file that is not
    safetensors, or one shorter than its header says (an interrupted download).
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError("checkpoint_not_found", f"{path} does not exist; pass the path of sv3d_p.safetensors or sv3d_u.safetensors")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise _invalid(
                f"{path.name} is a pickle (.ckpt/.pt/.bin) checkpoint; pickles can run code when loaded and are "
                "never read. Download the .safetensors file (stabilityai/sv3d: sv3d_p.safetensors / sv3d_u.safetensors)"
            )
        if len(head) < 8:
            raise _invalid(f"{path.name} is {size} bytes: not a safetensors file (or an empty download); download it again")
        (length,) = struct.unpack("<Q", head)
        if length <= 1 or length > min(size - 8, 100 * 2**20):
            raise _invalid(f"{path.name} is not a safetensors file (bad header length {length}); pass a .safetensors checkpoint")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise _invalid(f"{path.name} has a corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        raise _invalid(
            f"{path.name} is truncated: {size:,} bytes on disk, its header needs {8 + length + end:,}. "
            "The download was interrupted; download it again (hf download resumes)"
        )
    return header


def _header_shapes(header: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(info["shape"]) for name, info in header.items()}


# ----------------------------------------------------------------------------------------------
# The plan: target name <- source name(s), and a shape-level transform


@dataclass
class Entry:
    target: str  # name in the diffusers/transformers component
    source: str  # name in the sgm checkpoint
    op: str = "copy"  # copy | linear_from_conv (drop 1x1 spatial dims) | transpose | chunk3:<i> (q/k/v of a fused in_proj)

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.op == "copy":
            return tuple(source_shape)
        if self.op == "linear_from_conv":
            return tuple(source_shape[:2])
        if self.op == "transpose":
            return tuple(reversed(source_shape))
        if self.op.startswith("chunk3:"):
            return (source_shape[0] // 3, *source_shape[1:])
        raise ValueError(self.op)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.op == "copy":
            return tensor
        if self.op == "linear_from_conv":
            return tensor.reshape(tensor.shape[:2])
        if self.op == "transpose":
            return tensor.t().contiguous()
        if self.op.startswith("chunk3:"):
            return tensor.chunk(3, dim=0)[int(self.op[7:])].contiguous()
        raise ValueError(self.op)


@dataclass
class ComponentPlan:
    name: str  # sub-folder: unet | vae | image_encoder
    config: dict[str, Any]  # constructor arguments (unet, vae) or CLIPVisionConfig fields
    entries: list[Entry]
    weights_name: str  # diffusion_pytorch_model.safetensors | model.safetensors

    def build_meta(self) -> torch.nn.Module:
        """The component's module on the meta device: parameter names and shapes, no memory."""
        with torch.device("meta"):
            return _component_class(self.name)(**self.config) if self.name != "image_encoder" else _clip_model(self.config)


@dataclass
class ConversionPlan:
    variant: str  # sv3d_p | sv3d_u
    components: list[ComponentPlan]
    ignored: list[str]  # checkpoint names deliberately not converted (see the module docstring)
    time_id_dims: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    def problems(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Every missing, unexpected or mis-shaped name, against each component built on the meta device."""
        found: list[str] = []
        for component in self.components:
            expected = {k: tuple(v.shape) for k, v in component.build_meta().state_dict().items()}
            produced = {e.target: e.shape(shapes[e.source]) for e in component.entries}
            for name in sorted(set(expected) - set(produced)):
                found.append(f"{component.name}: no checkpoint tensor maps to {name}")
            for name in sorted(set(produced) - set(expected)):
                found.append(f"{component.name}: {name} does not exist in the {component.name} built from the inferred config")
            for name in sorted(set(produced) & set(expected)):
                if produced[name] != expected[name]:
                    found.append(f"{component.name}: {name} converts to shape {produced[name]}, the model needs {expected[name]}")
        return found

    def unmapped(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        used = {e.source for c in self.components for e in c.entries} | set(self.ignored)
        return sorted(set(shapes) - used)


def _component_class(name: str):
    if name == "unet":
        from im3d.diffusion.orbit_video import OrbitUNetSpatioTemporalConditionModel

        return OrbitUNetSpatioTemporalConditionModel
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    raise KeyError(name)


def _clip_model(config: dict[str, Any]):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def _strip(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


# ----------------------------------------------------------------------------------------------
# UNet: sgm VideoUNet -> diffusers UNetSpatioTemporalConditionModel


_RESNET_RENAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                   ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))  # fmt: skip


def _resnet_name(rest: str) -> str:
    """sgm VideoResBlock suffix -> diffusers SpatioTemporalResBlock suffix."""
    if rest.startswith("time_mixer."):
        return rest
    part, rest = ("temporal_res_block.", rest[len("time_stack.") :]) if rest.startswith("time_stack.") else ("spatial_res_block.", rest)
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return part + new + rest[len(old) :]
    return part + rest


def _attention_name(rest: str) -> str:
    """sgm SpatialVideoTransformer suffix -> diffusers TransformerSpatioTemporalModel suffix."""
    rest = re.sub(r"^time_stack\.", "temporal_transformer_blocks.", rest)
    rest = re.sub(r"^time_pos_embed\.0\.", "time_pos_embed.linear_1.", rest)
    return re.sub(r"^time_pos_embed\.2\.", "time_pos_embed.linear_2.", rest)


def plan_unet(shapes: dict[str, tuple[int, ...]], head_dim: int, time_id_dims: tuple[int, ...], num_frames: int, sample_size: int) -> ComponentPlan:
    s = _strip(shapes, UNET_PREFIX)
    need = ["input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight", "label_emb.0.0.weight"]
    if any(k not in s for k in need):
        raise _invalid("the checkpoint has no complete sgm VideoUNet under model.diffusion_model.; is it an SV3D checkpoint?")
    model_channels, in_channels = s["input_blocks.0.0.weight"][:2]
    blocks = _indices(s, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in s]
    per_level = (downs[0] - 1) if downs else (len(blocks) - 1)
    levels = len(downs) + 1
    if per_level < 1 or len(blocks) != 1 + levels * per_level + len(downs):
        raise _invalid(f"unexpected sgm UNet layout: input blocks {blocks}, downsamplers at {downs}")
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(s[f"input_blocks.{first}.0.in_layers.2.weight"][0])
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in s)
    depths = {len(_indices(s, rf"{re.escape(k[: -len('proj_in.weight')])}transformer_blocks\.(\d+)\.")) for k in s if k.endswith("proj_in.weight")}
    if len(depths) != 1:
        raise _invalid(f"transformer depths differ between blocks ({sorted(depths)}); this converter handles one depth")
    attn2 = next(k for k in s if k.endswith("attn2.to_k.weight"))
    if any(c % head_dim for c in channels):
        raise _invalid(f"UNet channels {channels} are not multiples of the attention head width {head_dim}; pass unet_head_dim")
    adm = s["label_emb.0.0.weight"][1]
    if sum(time_id_dims) != adm:
        raise _invalid(f"the UNet's vector conditioning is {adm} wide, the per-frame ids {time_id_dims} sum to {sum(time_id_dims)}")
    config = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": s["out.2.weight"][0],
        "down_block_types": tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(attention)),
        "block_out_channels": tuple(channels),
        "addition_time_embed_dim": time_id_dims[0],
        "projection_class_embeddings_input_dim": adm,
        "layers_per_block": per_level,
        "cross_attention_dim": s[attn2][1],
        "transformer_layers_per_block": depths.pop(),
        "num_attention_heads": tuple(c // head_dim for c in channels),
        "num_frames": num_frames,
        "addition_time_embed_dims": tuple(time_id_dims),
    }
    if s["time_embed.0.weight"][0] != 4 * model_channels or model_channels != channels[0]:
        raise _invalid("the UNet's time embedding is not 4 x its base width, as diffusers' spatio-temporal UNet requires")

    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}  # fmt: skip
    entries = []
    for key in s:
        target = None
        for old, new in fixed.items():
            if key.startswith(old):
                target = new + key[len(old) :]
        if target is None:
            if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                level, r = divmod(i - 1, per_level + 1)
                if r == per_level:  # the level's downsampler
                    target = f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}"
                elif j == 0:
                    target = f"down_blocks.{level}.resnets.{r}.{_resnet_name(rest)}"
                else:
                    target = f"down_blocks.{level}.attentions.{r}.{_attention_name(rest)}"
            elif m := re.match(r"middle_block\.(\d+)\.(.*)", key):
                j, rest = int(m[1]), m[2]
                target = f"mid_block.attentions.0.{_attention_name(rest)}" if j == 1 else f"mid_block.resnets.{j // 2}.{_resnet_name(rest)}"
            elif m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                level, r = divmod(i, per_level + 1)
                if j == 0:
                    target = f"up_blocks.{level}.resnets.{r}.{_resnet_name(rest)}"
                elif rest.startswith("conv."):  # Upsample: the last module of the level's last block
                    target = f"up_blocks.{level}.upsamplers.0.{rest}"
                else:
                    target = f"up_blocks.{level}.attentions.{r}.{_attention_name(rest)}"
        if target is None:
            raise _invalid(f"unknown UNet tensor {UNET_PREFIX}{key}; this is not the sgm VideoUNet SV3D uses")
        entries.append(Entry(target, UNET_PREFIX + key))
    return ComponentPlan("unet", config, entries, "diffusion_pytorch_model.safetensors")


# ----------------------------------------------------------------------------------------------
# VAE: conditioner encoder + first-stage decoder -> diffusers AutoencoderKL


def _ldm_vae_name(key: str, num_up: int) -> tuple[str, str]:
    """One sgm/LDM autoencoder tensor suffix (encoder.* / decoder.* / quant_conv.*) -> (diffusers name, op)."""
    op = "copy"
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return key, op  # quant_conv.*
    side, rest = m[1], m[2]
    rest = rest.replace("nin_shortcut.", "conv_shortcut.")
    if m2 := re.match(r"down\.(\d+)\.block\.(\d+)\.(.*)", rest):
        rest = f"down_blocks.{m2[1]}.resnets.{m2[2]}.{m2[3]}"
    elif m2 := re.match(r"down\.(\d+)\.downsample\.(.*)", rest):
        rest = f"down_blocks.{m2[1]}.downsamplers.0.{m2[2]}"
    elif m2 := re.match(r"up\.(\d+)\.block\.(\d+)\.(.*)", rest):  # sgm counts up levels from the output side
        rest = f"up_blocks.{num_up - 1 - int(m2[1])}.resnets.{m2[2]}.{m2[3]}"
    elif m2 := re.match(r"up\.(\d+)\.upsample\.(.*)", rest):
        rest = f"up_blocks.{num_up - 1 - int(m2[1])}.upsamplers.0.{m2[2]}"
    elif m2 := re.match(r"mid\.block_(\d)\.(.*)", rest):
        rest = f"mid_block.resnets.{int(m2[1]) - 1}.{m2[2]}"
    elif m2 := re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)", rest):
        name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m2[1]]
        rest = f"mid_block.attentions.0.{name}.{m2[2]}"
        if name != "group_norm" and m2[2] == "weight":
            op = "linear_from_conv"  # 1x1 conv in LDM, linear in diffusers' Attention
    elif rest.startswith("norm_out."):
        rest = "conv_norm_out." + rest[len("norm_out.") :]
    return f"{side}.{rest}", op


def plan_vae(shapes: dict[str, tuple[int, ...]]) -> tuple[ComponentPlan, list[str]]:
    enc = _strip(shapes, ENCODER_PREFIX)
    dec = _strip(shapes, DECODER_PREFIX)
    if "encoder.conv_in.weight" not in enc or "quant_conv.weight" not in enc:
        raise _invalid(f"no autoencoder encoder under {ENCODER_PREFIX}; is it an SV3D checkpoint?")
    if "decoder.conv_in.weight" not in dec:
        raise _invalid(f"no image decoder under {DECODER_PREFIX}decoder.; is it an SV3D checkpoint?")
    if any(k.startswith(("decoder.time_", "decoder.up.0.block.0.time_stack")) or "time_mix" in k for k in dec):
        raise _invalid("the first stage has a temporal video decoder (an SVD checkpoint, not SV3D); this converter handles SV3D")
    levels = _indices(enc, r"encoder\.down\.(\d+)\.")
    channels = tuple(enc[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels)
    per_level = len(_indices(enc, r"encoder\.down\.0\.block\.(\d+)\."))
    latent = enc["quant_conv.weight"][0] // 2
    config = {
        "in_channels": enc["encoder.conv_in.weight"][1],
        "out_channels": dec["decoder.conv_out.weight"][0],
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "up_block_types": ("UpDecoderBlock2D",) * len(levels),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "latent_channels": latent,
        "sample_size": 576,
        "scaling_factor": SGM_SCALE_FACTOR,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": False,  # SV3D decodes the latent directly (sgm AutoencodingEngine)
    }
    entries, ignored = [], []
    for key in enc:
        if key.startswith(("decoder.", "post_quant_conv.")):
            ignored.append(ENCODER_PREFIX + key)  # the conditioner autoencoder's decoder: never run
            continue
        target, op = _ldm_vae_name(key, len(levels))
        entries.append(Entry(target, ENCODER_PREFIX + key, op))
    for key in dec:
        target, op = _ldm_vae_name(key, len(levels))
        entries.append(Entry(target, DECODER_PREFIX + key, op))
    return ComponentPlan("vae", config, entries, "diffusion_pytorch_model.safetensors"), ignored


# ----------------------------------------------------------------------------------------------
# Image encoder: OpenCLIP VisionTransformer -> transformers CLIPVisionModelWithProjection


_CLIP_TEXT_LEFTOVERS = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale", "attn_mask")


def plan_clip(shapes: dict[str, tuple[int, ...]], head_dim: int | None) -> tuple[ComponentPlan, list[str]]:
    s = _strip(shapes, CLIP_PREFIX)
    if "visual.conv1.weight" not in s or "visual.proj" not in s:
        raise _invalid(f"no OpenCLIP vision tower under {CLIP_PREFIX}visual.; is it an SV3D checkpoint?")
    width, _, patch, _ = s["visual.conv1.weight"]
    tokens = s["visual.positional_embedding"][0]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise _invalid(f"the OpenCLIP position embedding has {tokens} tokens: not 1 + a square grid")
    layers = _indices(s, r"visual\.transformer\.resblocks\.(\d+)\.")
    if head_dim is None:  # OpenCLIP's head_width: ViT-H/14 80, ViT-bigG/14 104, otherwise 64
        head_dim = {1280: 80, 1664: 104}.get(width, 64)
    if width % head_dim:
        raise _invalid(f"OpenCLIP width {width} is not a multiple of the head width {head_dim}; pass clip_head_dim")
    extra = [k for k in s if k.startswith("visual.") and re.search(r"\.ls_\d\.|attn_pool|\.ln_attn\.|\.ln_inner\.", k)]
    if extra:
        raise _invalid(f"the OpenCLIP tower has layers CLIPVisionModel does not ({extra[0]}); not SV3D's ViT-H/14")
    config = {
        "hidden_size": width,
        "intermediate_size": s["visual.transformer.resblocks.0.mlp.c_fc.weight"][0],
        "projection_dim": s["visual.proj"][1],
        "num_hidden_layers": len(layers),
        "num_attention_heads": width // head_dim,
        "num_channels": s["visual.conv1.weight"][1],
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",  # OpenCLIP's nn.GELU (exact), not OpenAI CLIP's quick_gelu
        "layer_norm_eps": 1e-5,  # torch.nn.LayerNorm's default, as OpenCLIP
    }
    top = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "visual.ln_post.weight": "vision_model.post_layernorm.weight", "visual.ln_post.bias": "vision_model.post_layernorm.bias"}  # fmt: skip
    block = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
             "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}  # fmt: skip
    entries, ignored = [], []
    for key in s:
        src = CLIP_PREFIX + key
        if key in top:
            entries.append(Entry(top[key], src))
        elif key == "visual.proj":  # x @ proj in OpenCLIP, a bias-free Linear in transformers
            entries.append(Entry("visual_projection.weight", src, "transpose"))
        elif m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.*)", key):
            layer, rest = f"vision_model.encoder.layers.{m[1]}.", m[2]
            if m2 := re.match(r"attn\.in_proj_(weight|bias)", rest):
                for i, name in enumerate("qkv"):
                    entries.append(Entry(f"{layer}self_attn.{name}_proj.{m2[1]}", src, f"chunk3:{i}"))
                continue
            for old, new in block.items():
                if rest.startswith(old):
                    entries.append(Entry(layer + new + rest[len(old) :], src))
                    break
            else:
                raise _invalid(f"unknown OpenCLIP tensor {src}")
        elif key.startswith(_CLIP_TEXT_LEFTOVERS) or key.endswith("attn_mask"):
            ignored.append(src)  # text side kept by `del model.transformer`; unused for images
        else:
            raise _invalid(f"unknown OpenCLIP tensor {src}")
    return ComponentPlan("image_encoder", config, entries, "model.safetensors"), ignored


# ----------------------------------------------------------------------------------------------
# The whole checkpoint


def detect_sv3d_variant(shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """("sv3d_p" | "sv3d_u", per-frame id widths) from the UNet's vector-conditioning width."""
    key = UNET_PREFIX + "label_emb.0.0.weight"
    if key not in shapes:
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in shapes):
            raise _invalid("this sgm checkpoint's UNet has no vector conditioning (label_emb): not SV3D")
        sample = ", ".join(list(shapes)[:3])
        raise _invalid(
            f"this is not an sgm SV3D checkpoint (no {UNET_PREFIX}*; first names: {sample}). "
            "Pass Stability's sv3d_p.safetensors or sv3d_u.safetensors; a diffusers folder needs no conversion"
        )
    width = shapes[key][1]
    if width == 768:
        raise _invalid("this is a Stable Video Diffusion checkpoint (768-wide fps/motion/cond_aug vector), not SV3D")
    if width not in SV3D_VECTOR_LAYOUTS:
        raise _invalid(f"vector conditioning {width} wide: neither SV3D_p (1280) nor SV3D_u (256); pass time_id_dims")
    return SV3D_VECTOR_LAYOUTS[width]


def plan_sv3d_conversion(
    shapes: dict[str, tuple[int, ...]],  # checkpoint name -> shape (a header, or a manifest)
    unet_head_dim: int = 64,  # sgm num_head_channels
    clip_head_dim: int | None = None,  # OpenCLIP head_width; None: by width (ViT-H: 80)
    time_id_dims: tuple[int, ...] | None = None,  # None: from the vector width (SV3D_p / SV3D_u)
    num_frames: int = 21,  # frames the UNet's config advertises (SV3D: 21)
    sample_size: int = 72,  # latent side the UNet's config advertises (576 / 8)
) -> ConversionPlan:
    """Everything about a conversion that names and shapes decide; raises `ConvertError` when they do not fit."""
    if time_id_dims is None:
        variant, time_id_dims = detect_sv3d_variant(shapes)
    else:
        variant = "sv3d_p" if len(time_id_dims) == 3 else "sv3d_u" if len(time_id_dims) == 1 else "custom"
    unet = plan_unet(shapes, unet_head_dim, tuple(time_id_dims), num_frames, sample_size)
    vae, vae_ignored = plan_vae(shapes)
    clip, clip_ignored = plan_clip(shapes, clip_head_dim)
    plan = ConversionPlan(variant, [unet, vae, clip], vae_ignored + clip_ignored, tuple(time_id_dims))
    leftovers = plan.unmapped(shapes)
    if leftovers:
        raise _invalid(f"{len(leftovers)} checkpoint tensors have no place in the converted model, e.g. {leftovers[:3]}")
    return plan


# ----------------------------------------------------------------------------------------------
# Writing


def _shard_plan(entries: list[Entry], nbytes: dict[str, int], max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = nbytes[entry.target]
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _write_component(folder: Path, plan: ComponentPlan, reader: Any, header: dict, dtype: torch.dtype | None,
                     max_shard_bytes: int, tick: Callable[[int], None], cancel: CancelFn | None) -> None:  # fmt: skip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    out_dtype = {e.target: dtype if dtype is not None and SAFETENSORS_DTYPES[header[e.source]["dtype"]].is_floating_point
                 else SAFETENSORS_DTYPES[header[e.source]["dtype"]] for e in plan.entries}  # fmt: skip
    nbytes = {e.target: math.prod(e.shape(tuple(header[e.source]["shape"]))) * out_dtype[e.target].itemsize for e in plan.entries}
    shards = _shard_plan(sorted(plan.entries, key=lambda e: e.target), nbytes, max_shard_bytes)
    stem, suffix = plan.weights_name.rsplit(".", 1)
    names = [plan.weights_name] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
    weight_map = {}
    uses: dict[str, int] = {}
    for entry in plan.entries:
        uses[entry.source] = uses.get(entry.source, 0) + 1
    held: dict[str, torch.Tensor] = {}  # fused q/k/v sources, read once, dropped after their last use
    for shard, name in zip(shards, names, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for entry in shard:
            check_cancel(cancel)
            source = held.get(entry.source)
            if source is None:
                source = reader.get_tensor(entry.source)
            uses[entry.source] -= 1
            if uses[entry.source]:
                held[entry.source] = source
            else:
                held.pop(entry.source, None)
            tensors[entry.target] = entry.apply(source).to(out_dtype[entry.target]).contiguous()
            weight_map[entry.target] = name
            tick(nbytes[entry.target])
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{plan.weights_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")


# SVD / SV3D's sampler: EDM sigmas (Karras, 0.002 .. 700), v-prediction, continuous timesteps.
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}


def _write_configs(root: Path, plan: ConversionPlan) -> None:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    for component in plan.components:
        if component.name == "image_encoder":
            config = CLIPVisionConfig(**component.config)
            config.architectures = ["CLIPVisionModelWithProjection"]
            config.save_pretrained(str(root / component.name))
        else:
            component.build_meta().save_config(str(root / component.name))
    side = next(c for c in plan.components if c.name == "image_encoder").config["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=OPENCLIP_MEAN,
        image_std=OPENCLIP_STD, resample=3, do_center_crop=True,
    ).save_pretrained(str(root / "feature_extractor"))  # fmt: skip
    EulerDiscreteScheduler(**SVD_SCHEDULER).save_pretrained(str(root / "scheduler"))
    import diffusers

    index = {
        "_class_name": "OrbitVideoPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def convert_sv3d_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    *,
    dtype: torch.dtype | None = None,  # None: keep the checkpoint's (fp32 for Stability's files)
    overwrite: bool = False,  # replace an existing out_dir (only after the new one is complete)
    max_shard_bytes: int = 2 * 2**30,  # largest weights file written; bounds peak memory
    unet_head_dim: int = 64,
    clip_head_dim: int | None = None,
    time_id_dims: tuple[int, ...] | None = None,
) -> Path:
    """Convert Stability's `sv3d_p.safetensors` / `sv3d_u.safetensors` into a diffusers-layout folder.

    Progress goes from 0 to 1 by bytes converted; `cancel()` is checked between tensors and a
    cancelled run raises `Cancelled` and leaves nothing behind.
    """
    from safetensors import safe_open

    src, out_dir = Path(src), Path(out_dir)
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    if src.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise _invalid(f"{src.name} is a pickle checkpoint, which is never loaded (it can run code); use the .safetensors file")
    header = read_safetensors_header(src)
    shapes = _header_shapes(header)
    plan = plan_sv3d_conversion(shapes, unet_head_dim, clip_head_dim, time_id_dims)
    problems = plan.problems(shapes)
    if problems:
        raise _invalid(f"the checkpoint does not fit the inferred {plan.variant} architecture: " + "; ".join(problems[:5]))
    if out_dir.exists() and not overwrite:
        raise ConvertError("output_exists", f"{out_dir} already exists; choose another folder or pass overwrite")
    report(0.0, f"converting {src.name} ({plan.variant}) -> {out_dir}")

    itemsize = {name: SAFETENSORS_DTYPES[info["dtype"]].itemsize for name, info in header.items()}
    total = sum(math.prod(e.shape(shapes[e.source])) * (dtype.itemsize if dtype is not None else itemsize[e.source])
                for c in plan.components for e in c.entries)  # fmt: skip  (bytes written, the unit of `tick`)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report(0.02 + 0.96 * min(done / max(total, 1), 1.0), f"converting {src.name}: {done / 2**30:.2f} / {total / 2**30:.2f} GiB")

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_configs(tmp, plan)
        with safe_open(str(src), framework="pt") as reader:
            for component in plan.components:
                _write_component(tmp / component.name, component, reader, header, dtype, max_shard_bytes, tick, cancel)
        record = {
            "source": src.name,
            "source_bytes": src.stat().st_size,
            "variant": plan.variant,
            "time_id_dims": list(plan.time_id_dims),
            "dtype": str(dtype or "as checkpoint").replace("torch.", ""),
            "ignored_tensors": len(plan.ignored),
            "converter": "im3d.diffusion.convert_sv3d",
        }
        (tmp / "im3d_conversion.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        problems = verify_pipeline_folder(tmp)
        if problems:
            raise ConvertError("internal_error", "the converted folder failed verification: " + "; ".join(problems[:5]))
        if out_dir.exists():  # overwrite: move the old one aside only now that the new one is complete
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, trash)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno in STORAGE_ERRNOS:
            raise storage_error(error, "write the converted model", out_dir.parent) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(1.0, f"converted {src.name} ({plan.variant}) in {time.perf_counter() - started:.0f} s -> {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------------------------
# Verification of a diffusers-layout folder, from configs and headers only


def _weights_shapes(folder: Path, weights_name: str) -> tuple[dict[str, tuple[int, ...]] | None, list[str]]:
    """Names and shapes of a component's safetensors weights (single file or sharded), and problems."""
    single, index = folder / weights_name, folder / f"{weights_name}.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            return None, [f"{index} is not a valid weights index"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.ckpt")]
        hint = f" (only pickle weights {pickles}, which are never loaded)" if pickles else ""
        return None, [f"{folder.name}: no {weights_name}{hint}"]
    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for path in files:
        try:
            shapes.update(_header_shapes(read_safetensors_header(path)))
        except Im3dError as error:
            problems.append(f"{folder.name}: {error.message}")
    return shapes, problems


def verify_pipeline_folder(folder: str | Path) -> list[str]:
    """Problems of a diffusers-layout orbit-model folder (empty list: complete and consistent).

    Each component's config is built into its class on the meta device and compared, name by name
    and shape by shape, with the safetensors headers; the scheduler and feature extractor configs
    are loaded. No weights are read, so a full-size folder verifies in seconds.
    """
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from im3d.diffusion.orbit_video import OrbitUNetSpatioTemporalConditionModel

    root = Path(folder)
    if not (root / "model_index.json").is_file():
        return [f"{root}: no model_index.json (not a diffusers-layout folder)"]
    problems: list[str] = []
    for name, weights_name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                               ("image_encoder", "model.safetensors")):  # fmt: skip
        sub = root / name
        config_path = sub / "config.json"
        if not config_path.is_file():
            problems.append(f"{name}: no {name}/config.json")
            continue
        try:
            config = json.loads(config_path.read_text())
            with torch.device("meta"):
                if name == "unet":
                    module = OrbitUNetSpatioTemporalConditionModel.from_config(config)
                elif name == "vae":
                    cls_name = config.get("_class_name", "AutoencoderKLTemporalDecoder")
                    if cls_name not in ("AutoencoderKL", "AutoencoderKLTemporalDecoder"):
                        problems.append(f"vae: config names {cls_name}; expected AutoencoderKL or AutoencoderKLTemporalDecoder")
                        continue
                    module = getattr(diffusers, cls_name).from_config(config)
                else:
                    from transformers import CLIPVisionModelWithProjection

                    module = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(str(sub)))
        except Exception as error:  # noqa: BLE001 - any config the classes reject is a problem to report
            problems.append(f"{name}: config.json does not build {name}: {str(error).splitlines()[0]}")
            continue
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found, read_problems = _weights_shapes(sub, weights_name)
        problems += read_problems
        if found is None:
            continue
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing:
            problems.append(f"{name}: {len(missing)} weights missing, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{name}: {len(unexpected)} unexpected weights, e.g. {unexpected[:3]}")
        for key in sorted(set(expected) & set(found)):
            if expected[key] != found[key]:
                problems.append(f"{name}: {key} has shape {found[key]}, the config needs {expected[key]}")
    try:
        diffusers.EulerDiscreteScheduler.from_pretrained(str(root), subfolder="scheduler")
    except Exception as error:  # noqa: BLE001
        problems.append(f"scheduler: {str(error).splitlines()[0]}")
    try:
        CLIPImageProcessor.from_pretrained(str(root), subfolder="feature_extractor")
    except Exception as error:  # noqa: BLE001
        problems.append(f"feature_extractor: {str(error).splitlines()[0]}")
    return problems


__all__ = [
    "ConversionPlan",
    "ConvertError",
    "convert_sv3d_checkpoint",
    "detect_sv3d_variant",
    "plan_sv3d_conversion",
    "read_safetensors_header",
    "verify_pipeline_folder",
]
