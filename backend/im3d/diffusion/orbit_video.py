"""Image -> orbit video, and re-diffusion of rendered orbits (IM-3D's loop), on diffusers blocks.

`OrbitVideoPipeline` is an SV3D-style camera-conditioned video diffusion pipeline built from
diffusers components, so `OrbitVideoPipeline.from_pretrained(folder)` loads any folder in the
diffusers layout with these sub-folders (`model_index.json` names them):

    unet/               OrbitUNetSpatioTemporalConditionModel (a UNetSpatioTemporalConditionModel
                        whose added time ids are per frame; see below)
    vae/                AutoencoderKLTemporalDecoder (SVD) or AutoencoderKL (SV3D's image decoder)
    image_encoder/      CLIPVisionModelWithProjection
    feature_extractor/  CLIPImageProcessor (only its mean/std are used)
    scheduler/          EulerDiscreteScheduler (v-prediction, continuous EDM timesteps, as SVD)

Conditioning, as SV3D_p (Stability's generative-models, `configs/sv3d_p.yaml`):
- cross-attention context: the CLIP image embedding of the reference image;
- channel concat: the VAE latent (unscaled `latent_dist.mode()`) of the reference image plus
  `cond_aug` Gaussian noise, repeated over frames; the unconditional branch zeroes both;
- `added_time_ids` of shape [batch, frames, 3]: per frame `(cond_aug, polar_rad, azimuth_rad)`
  with `polar = 90° - elevation` and azimuth relative to the reference view. Each id gets its
  own sinusoidal embedding (widths `addition_time_embed_dims`, SV3D: 256, 512, 512, summing to
  `projection_class_embeddings_input_dim` = 1280), the concatenation goes through the UNet's
  `add_embedding` and is added to the timestep embedding of *that frame*. Stock SVD has one set
  of ids per video; per-frame ids are what lets each frame be told its camera.

Frame order: SV3D generates frame i at azimuth (i + 1)·360°/F, the last frame being the
reference view; `OrbitFrames` are returned sorted by azimuth, frame 0 the reference view at
azimuth 0, so they line up with `im3d.cameras.orbit_cameras`. As in Stability's sampler, the
reference view's generated frame is replaced by the conditioning image.

SV3D_u (`addition_time_embed_dims` (256,)) gets only cond_aug per frame (no camera: 21 frames
at elevation 0, which its profile enforces); a stock SVD folder loads and gets SVD's
(fps_id, motion_bucket_id, cond_aug). Model profiles: `im3d.diffusion.profiles`. Another orbit-video model is an
adapter: subclass `OrbitVideoPipeline` and override `model_azimuths_deg` / `camera_time_ids`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.unets.unet_spatio_temporal_condition import (
    UNetSpatioTemporalConditionOutput,
)
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import StableVideoDiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from im3d.cameras import Cameras, orbit_cameras
from im3d.errors import Cancelled, check_cancel

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


# ----------------------------------------------------------------------------------------------
# The UNet: SVD's spatio-temporal UNet with per-frame added time ids


class OrbitUNetSpatioTemporalConditionModel(UNetSpatioTemporalConditionModel):
    """`UNetSpatioTemporalConditionModel` whose `added_time_ids` may be per frame ([B, F, n]).

    Same modules and parameter names as the parent (an SVD/SV3D state dict loads unchanged);
    `addition_time_embed_dims` optionally gives each id its own sinusoidal width (SV3D_p:
    (256, 512, 512); SV3D_u: (256,)); when None, a 1280-wide vector with 256-wide ids is taken
    for SV3D_p and otherwise every id uses `addition_time_embed_dim` as in stock SVD.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 1280,
        layers_per_block: int | tuple[int] = 2,
        cross_attention_dim: int | tuple[int] = 1024,
        transformer_layers_per_block: int | tuple[int, tuple[tuple]] = 1,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        num_frames: int = 21,
        addition_time_embed_dims: tuple[int, ...] | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            num_attention_heads=num_attention_heads,
            num_frames=num_frames,
        )
        if addition_time_embed_dims is None and (projection_class_embeddings_input_dim, addition_time_embed_dim) == (1280, 256):
            # SV3D_p conversions made elsewhere (no addition_time_embed_dims in their config): cond_aug, polar, azimuth
            addition_time_embed_dims = (256, 512, 512)
        if addition_time_embed_dims is None:  # stock SVD (fps, motion bucket, cond_aug: 3 x 256) and SV3D_u (256)
            if projection_class_embeddings_input_dim % addition_time_embed_dim:
                raise ValueError("projection_class_embeddings_input_dim must be a multiple of addition_time_embed_dim")
            count = projection_class_embeddings_input_dim // addition_time_embed_dim
            addition_time_embed_dims = (addition_time_embed_dim,) * count
        if sum(addition_time_embed_dims) != projection_class_embeddings_input_dim:
            raise ValueError(
                f"addition_time_embed_dims {tuple(addition_time_embed_dims)} must sum to "
                f"projection_class_embeddings_input_dim {projection_class_embeddings_input_dim}"
            )
        self.time_id_dims = tuple(int(d) for d in addition_time_embed_dims)
        # Parameter-free sinusoids (cos first, no shift: sgm's `timestep_embedding`).
        self.add_time_projs = torch.nn.ModuleList(Timesteps(d, True, downscale_freq_shift=0) for d in self.time_id_dims)

    @property
    def num_time_ids(self) -> int:
        return len(self.time_id_dims)

    def embed_time_ids(self, added_time_ids: Tensor, num_frames: int) -> Tensor:
        """[B, n] or [B, F, n] ids -> [B*F, C] embeddings added to the timestep embedding."""
        if added_time_ids.ndim == 2:
            added_time_ids = added_time_ids[:, None].expand(-1, num_frames, -1)
        B, Fr, n = added_time_ids.shape
        assert Fr == num_frames and n == self.num_time_ids, (added_time_ids.shape, num_frames, self.num_time_ids)
        flat = added_time_ids.reshape(B * Fr, n)
        parts = [proj(flat[:, i]) for i, proj in enumerate(self.add_time_projs)]  # each [B*F, d_i]
        time_embeds = torch.cat(parts, dim=-1).to(self.add_embedding.linear_1.weight.dtype)
        return self.add_embedding(time_embeds)

    def forward(
        self,
        sample: Tensor,  # [B, F, C_in, h, w]
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,  # [B, S, D]
        added_time_ids: Tensor,  # [B, n] or [B, F, n]
        return_dict: bool = True,
    ) -> UNetSpatioTemporalConditionOutput | tuple:
        batch_size, num_frames = sample.shape[:2]
        up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        upsample_size = None

        # 1. time: the denoising step is shared, the cameras are per frame
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch_size)
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)  # [B, C]
        emb = emb.repeat_interleave(num_frames, dim=0)  # [B*F, C]
        emb = emb + self.embed_time_ids(added_time_ids, num_frames).to(emb.dtype)

        sample = sample.flatten(0, 1)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        # 2. pre-process
        sample = self.conv_in(sample)
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        # 3. down
        down_block_res_samples: tuple = (sample,)
        for block in self.down_blocks:
            kwargs: dict[str, Any] = {"hidden_states": sample, "temb": emb, "image_only_indicator": image_only_indicator}
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample, res_samples = block(**kwargs)
            down_block_res_samples += res_samples

        # 4. mid
        sample = self.mid_block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=encoder_hidden_states,
            image_only_indicator=image_only_indicator,
        )

        # 5. up
        for i, block in enumerate(self.up_blocks):
            res_samples = down_block_res_samples[-len(block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            kwargs = {
                "hidden_states": sample,
                "temb": emb,
                "res_hidden_states_tuple": res_samples,
                "upsample_size": upsample_size,
                "image_only_indicator": image_only_indicator,
            }
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample = block(**kwargs)

        # 6. post-process
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])
        if not return_dict:
            return (sample,)
        return UNetSpatioTemporalConditionOutput(sample=sample)


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class OrbitVideoPipelineOutput(BaseOutput):
    frames: Tensor  # [B, F, 3, H, W] in [0, 1] (model frame order), or latents [B, F, 4, h, w]


def resize_antialiased(images: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, C, H, W] -> [B, C, *size]: Gaussian blur against aliasing, then bicubic (corners aligned).

    The CLIP preprocessing SVD / SV3D were trained with (diffusers' SVD pipeline and Stability's
    sgm resize this way): sigma ``max((H / h - 1) / 2, 0.001)`` per axis as in skimage, a kernel
    of about 4 sigma (odd, at least 3 taps), reflected borders.
    """
    blurred = images
    for axis, (old, new) in ((-1, (images.shape[-1], size[1])), (-2, (images.shape[-2], size[0]))):
        sigma = max((old / new - 1.0) / 2.0, 0.001)
        taps = int(max(4.0 * sigma, 3))
        taps += 1 - taps % 2  # odd
        x = torch.arange(taps, dtype=images.dtype, device=images.device) - taps // 2
        kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
        kernel = kernel / kernel.sum()
        half = taps // 2
        shape, pad = ((1, 1, 1, taps), (half, half, 0, 0)) if axis == -1 else ((1, 1, taps, 1), (0, 0, half, half))
        B, C, H, W = blurred.shape
        padded = F.pad(blurred.reshape(B * C, 1, H, W), pad, mode="reflect")
        blurred = F.conv2d(padded, kernel.reshape(shape)).reshape(B, C, H, W)
    return F.interpolate(blurred, size=size, mode="bicubic", align_corners=True)


def steps_for_strength(num_inference_steps: int, strength: float) -> int:
    """Denoising steps run at re-diffusion strength s: ceil(s·N), at least 1 (s = 1: all N)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return min(num_inference_steps, max(1, math.ceil(strength * num_inference_steps - 1e-9)))


def guidance_per_frame(num_frames: int, low: float, high: float, profile: str) -> Tensor:
    """[F] guidance scales: `linear` low -> high (SVD); `triangle` low at both ends, high mid-orbit
    (SV3D's TrianglePredictionGuider: the first and last frames sit next to the reference view)."""
    t = torch.linspace(0.0, 1.0, num_frames)
    if profile == "linear":
        return low + (high - low) * t
    if profile == "triangle":
        return low + (high - low) * (1.0 - (2.0 * t - 1.0).abs())
    raise ValueError(f"unknown guidance profile {profile!r}; use 'linear' or 'triangle'")


class OrbitVideoPipeline(DiffusionPipeline):
    r"""Camera-conditioned orbit-video diffusion (SV3D_p-style); see the module docstring."""

    model_cpu_offload_seq = "image_encoder->unet->vae"
    _callback_tensor_inputs = ("latents",)

    def __init__(self, vae, image_encoder, unet, scheduler, feature_extractor):
        super().__init__()
        self.register_modules(
            vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the five components from their sub-folders by role, whatever classes model_index.json
        names: `unet/` always as `OrbitUNetSpatioTemporalConditionModel`, `vae/` as the class its own
        config names (AutoencoderKLTemporalDecoder or AutoencoderKL). So SVD-style folders and
        third-party SV3D conversions load without their custom code."""
        import diffusers
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = str(pretrained_model_name_or_path)
        dtype = kwargs.pop("torch_dtype", None)
        shared = {k: kwargs.pop(k) for k in ("local_files_only", "cache_dir", "revision", "token") if k in kwargs}
        weights = dict(shared, use_safetensors=kwargs.pop("use_safetensors", True), torch_dtype=dtype)
        components = {name: kwargs.pop(name) for name in ("vae", "image_encoder", "unet", "scheduler", "feature_extractor") if name in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments to OrbitVideoPipeline.from_pretrained: {', '.join(kwargs)}")
        with warnings.catch_warnings():  # torch_dtype is renamed in newer diffusers/transformers
            warnings.simplefilter("ignore", FutureWarning)
            if "unet" not in components:
                components["unet"] = OrbitUNetSpatioTemporalConditionModel.from_pretrained(path, subfolder="unet", **weights)
            if "vae" not in components:
                vae_config = diffusers.AutoencoderKL.load_config(path, subfolder="vae", **shared)
                vae_name = vae_config.get("_class_name", "AutoencoderKLTemporalDecoder")
                if vae_name not in ("AutoencoderKLTemporalDecoder", "AutoencoderKL"):
                    raise ValueError(f"vae/config.json names {vae_name}; expected AutoencoderKLTemporalDecoder or AutoencoderKL")
                vae_class = getattr(diffusers, vae_name)
                components["vae"] = vae_class.from_pretrained(path, subfolder="vae", **weights)
            if "image_encoder" not in components:
                components["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
                    path, subfolder="image_encoder", **weights
                )
            if "feature_extractor" not in components:
                components["feature_extractor"] = CLIPImageProcessor.from_pretrained(
                    path, subfolder="feature_extractor", **shared
                )
            if "scheduler" not in components:
                components["scheduler"] = diffusers.EulerDiscreteScheduler.from_pretrained(
                    path, subfolder="scheduler", **shared
                )
        return cls(**components)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """As `DiffusionPipeline.save_pretrained`; model_index.json names the UNet by its diffusers base
        class, so the folder reads as an ordinary diffusers layout (`from_pretrained` above restores ours)."""
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["unet"] = ["diffusers", "UNetSpatioTemporalConditionModel"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # -- adapter points -------------------------------------------------------------------------

    @staticmethod
    def model_azimuths_deg(num_frames: int) -> list[float]:
        """Azimuth of each generated frame, relative to the reference view, in model order (SV3D)."""
        return [(360.0 * (i + 1) / num_frames) % 360.0 for i in range(num_frames)]

    def camera_time_ids(self, elevations_deg: Tensor, azimuths_deg: Tensor, cond_aug: float) -> Tensor:
        """[F] elevations and azimuths -> [F, n] added time ids, by what the UNet was trained with:
        SV3D_p (256, 512, 512): (cond_aug, polar, azimuth); SV3D_u (256,): (cond_aug,), no camera;
        stock SVD (256, 256, 256): (fps_id 6, motion_bucket_id 127, cond_aug), Stability's defaults."""
        polar = torch.deg2rad(90.0 - elevations_deg)
        azimuth = torch.deg2rad(torch.remainder(azimuths_deg, 360.0))
        cond = torch.full_like(polar, cond_aug)
        dims = tuple(getattr(self.unet, "time_id_dims", (256, 512, 512)))
        if len(dims) == 1:
            ids = cond[:, None]
        elif len(dims) == 3 and len(set(dims)) == 1:
            ids = torch.stack([torch.full_like(polar, 6.0), torch.full_like(polar, 127.0), cond], dim=-1)
        else:
            ids = torch.stack([cond, polar, azimuth], dim=-1)
        expected = getattr(self.unet, "num_time_ids", None)
        if expected is not None and expected != ids.shape[-1]:
            raise ValueError(f"the orbit UNet expects {expected} added time ids per frame, the pipeline builds {ids.shape[-1]}")
        return ids

    # -- pieces ---------------------------------------------------------------------------------

    def encode_clip(self, image: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 1, D] CLIP image embeddings."""
        size = self.image_encoder.config.image_size
        x = resize_antialiased(image * 2.0 - 1.0, (size, size))
        x = (x + 1.0) / 2.0
        mean = torch.tensor(self.feature_extractor.image_mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.feature_extractor.image_std, device=x.device, dtype=x.dtype)[:, None, None]
        x = ((x - mean) / std).to(dtype=self.image_encoder.dtype)
        return self.image_encoder(x).image_embeds[:, None]

    def _vae_upcast(self) -> tuple[bool, torch.dtype]:
        """Whether the VAE runs in fp32 although the pipeline is half precision (fp16 or bf16), as
        `force_upcast` asks: SV3D's sampler runs its autoencoder outside autocast (fp32)."""
        half = self.vae.dtype
        return half in (torch.float16, torch.bfloat16) and bool(getattr(self.vae.config, "force_upcast", False)), half

    def encode_vae(self, images: Tensor, chunk: int) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, 4, h, w] unscaled latent means, `chunk` images at a time."""
        upcast, half = self._vae_upcast()
        dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            parts = [
                self.vae.encode(images[i : i + chunk].to(dtype)).latent_dist.mode()
                for i in range(0, images.shape[0], chunk)
            ]
        finally:
            if upcast:
                self.vae.to(dtype=half)
        return torch.cat(parts)

    def decode(self, latents: Tensor, chunk: int) -> Tensor:
        """[B, F, 4, h, w] scaled latents -> [B, F, 3, H, W] in [0, 1], `chunk` frames at a time."""
        num_frames = latents.shape[1]
        upcast, half = self._vae_upcast()
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            frames = StableVideoDiffusionPipeline.decode_latents(self, latents.to(self.vae.dtype), num_frames, chunk)
        finally:
            if upcast:
                self.vae.to(dtype=half)
        return (frames.permute(0, 2, 1, 3, 4) / 2.0 + 0.5).clamp(0.0, 1.0)  # [B, F, 3, H, W]

    # -- call -----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Tensor,  # [B, 3, H, W] reference image in [0, 1]
        elevations_deg: Tensor | list[float],  # [F]
        azimuths_deg: Tensor | list[float],  # [F] relative to the reference view, model order
        num_inference_steps: int = 25,
        strength: float = 1.0,
        init_frames: Tensor | None = None,  # [B, F, 3, H, W] in [0, 1]: frames to re-diffuse
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 2.5,
        guidance_profile: str = "triangle",
        cond_aug: float = 1e-5,
        decode_chunk_size: int = 8,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable[[Any, int, Tensor, dict], dict] | None = None,
    ) -> OrbitVideoPipelineOutput:
        # 1. check inputs
        if image.ndim == 3:
            image = image[None]
        B, _, H, W = image.shape
        if H % self.vae_scale_factor or W % self.vae_scale_factor:
            raise ValueError(f"image height and width must be multiples of {self.vae_scale_factor}, got {H}x{W}")
        device = self._execution_device
        elevations = torch.as_tensor(elevations_deg, dtype=torch.float32)
        azimuths = torch.as_tensor(azimuths_deg, dtype=torch.float32)
        num_frames = azimuths.shape[0]
        if elevations.shape != (num_frames,):
            raise ValueError(f"need one elevation per frame: {tuple(elevations.shape)} vs {num_frames} azimuths")
        n_run = steps_for_strength(num_inference_steps, strength)
        use_init = init_frames is not None and n_run < num_inference_steps
        if init_frames is not None and init_frames.shape != (B, num_frames, 3, H, W):
            raise ValueError(f"init_frames must be {(B, num_frames, 3, H, W)}, got {tuple(init_frames.shape)}")
        do_cfg = max_guidance_scale > 1.0
        dtype = self.unet.dtype

        # 2. conditioning: CLIP embedding (cross-attention) and noise-augmented VAE latent (concat)
        image = image.to(device=device, dtype=torch.float32)
        image_embeddings = self.encode_clip(image).to(dtype)  # [B, 1, D]
        cond_pixels = image * 2.0 - 1.0
        cond_pixels = cond_pixels + cond_aug * randn_tensor(cond_pixels.shape, generator=generator, device=device)
        image_latents = self.encode_vae(cond_pixels, decode_chunk_size).to(dtype)  # [B, 4, h, w]
        image_latents = image_latents[:, None].repeat(1, num_frames, 1, 1, 1)
        time_ids = self.camera_time_ids(elevations, azimuths, cond_aug).to(device=device, dtype=dtype)
        time_ids = time_ids[None].repeat(B, 1, 1)  # [B, F, n]
        if do_cfg:
            image_embeddings = torch.cat([torch.zeros_like(image_embeddings), image_embeddings])
            image_latents = torch.cat([torch.zeros_like(image_latents), image_latents])
            time_ids = torch.cat([time_ids, time_ids])

        # 3. timesteps: re-diffusion runs the last ceil(s·N) of the N-step schedule
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        t_start = num_inference_steps - n_run
        timesteps = self.scheduler.timesteps[t_start:]
        self.scheduler.set_begin_index(t_start)

        # 4. initial latents: pure noise, or the encoded frames noised to the starting level
        h, w = H // self.vae_scale_factor, W // self.vae_scale_factor
        channels = self.vae.config.latent_channels
        noise = randn_tensor((B, num_frames, channels, h, w), generator=generator, device=device, dtype=torch.float32)
        if use_init:
            pixels = init_frames.to(device=device, dtype=torch.float32).flatten(0, 1) * 2.0 - 1.0
            x0 = self.encode_vae(pixels, decode_chunk_size).float() * self.vae.config.scaling_factor
            x0 = x0.reshape(B, num_frames, channels, h, w)
            latents = x0 + noise * self.scheduler.sigmas[t_start].to(device)
        else:
            latents = noise * self.scheduler.init_noise_sigma
        latents = latents.to(dtype)

        # 5. guidance per frame
        guidance = guidance_per_frame(num_frames, min_guidance_scale, max_guidance_scale, guidance_profile)
        guidance = guidance.to(device, dtype).reshape(1, num_frames, 1, 1, 1)  # broadcasts over latents

        # 6. denoising loop
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=2)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=image_embeddings, added_time_ids=time_ids, return_dict=False
            )[0]
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = outputs.pop("latents", latents)

        # 7. decode
        if output_type == "latent":
            frames = latents
        else:
            frames = self.decode(latents, decode_chunk_size).float()
        self.maybe_free_model_hooks()
        return OrbitVideoPipelineOutput(frames=frames)


# ----------------------------------------------------------------------------------------------
# The stage's API: reference image -> OrbitFrames, and re-diffusion


@dataclass
class OrbitFrames:
    """A generated orbit: a ready-made multi-view dataset (frame 0 is the reference view)."""

    images: Tensor  # [F, H, W, 3] float in [0, 1]
    masks: Tensor  # [F, H, W, 1] float in [0, 1], foreground.orbit_frame_mask: light parts kept, soft edges
    cameras: Cameras  # F cameras at `elevation_deg` / `azimuths_deg`, Blender world frame
    azimuths_deg: list[float]  # [F] azimuth of each frame, 0 = reference view
    elevation_deg: float
    evaluations: int  # network evaluations of the denoiser (CFG halves counted separately)

    def __post_init__(self) -> None:
        Fr, H, W = self.images.shape[:3]
        assert self.images.shape == (Fr, H, W, 3), self.images.shape
        assert self.masks.shape == (Fr, H, W, 1), self.masks.shape
        assert len(self.cameras) == Fr and len(self.azimuths_deg) == Fr


def orbit_radius(fov_deg: float, frame_fill: float, object_size: float = 1.0) -> float:
    """Camera distance at which an object `object_size` across spans `frame_fill` of the frame.

    The reference image is centred and scaled so its object spans `frame_fill` of the side; a
    pinhole camera with field of view `fov_deg` sees a width of 2·r·tan(fov/2) at distance r, so
    r = (object_size / 2) / (frame_fill · tan(fov / 2)). SV3D (fov 33.8°) at fill 0.85: 1.94 m.
    """
    return 0.5 * object_size / (frame_fill * math.tan(math.radians(fov_deg) / 2.0))


def orbit_frame_cameras(config: Any, num_views: int, size: int) -> tuple[Cameras, list[float]]:
    """Cameras (sorted by azimuth, frame 0 the reference view) of an orbit made with `config`."""
    d = config.diffusion
    azimuths = sorted(OrbitVideoPipeline.model_azimuths_deg(num_views))
    radius = orbit_radius(d.orbit_fov_deg, d.frame_fill, config.pipeline.object_size)
    cameras = orbit_cameras(
        num_views, elevation_deg=d.elevation_deg, radius=radius, fov_deg=d.orbit_fov_deg, width=size,
        azimuths_deg=azimuths,
    )  # fmt: skip
    return cameras, azimuths


def load_orbit_pipeline(config: Any):
    """The warm `OrbitVideoPipeline` for `config.diffusion.orbit_model` (loaded on first use)."""
    from im3d.diffusion.models import load_configured_pipeline

    return load_configured_pipeline(config, config.diffusion.orbit_model, "orbit-video model", OrbitVideoPipeline)


def generate_orbit(
    reference: Any,  # ReferenceImage (rgb [H, W, 3], mask [H, W, 1])
    config: Any,  # im3d.config.Config
    seed: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> OrbitFrames:
    """Reference image -> `config.diffusion.num_views` orbit frames with their cameras."""
    return _run_orbit(reference, None, 1.0, config, seed, progress, cancel)


def rediffuse(
    frames: Tensor,  # [F, H, W, 3] renders in [0, 1], frame j at azimuth j·360/F (OrbitFrames order)
    reference: Any,
    strength: float,
    config: Any,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> OrbitFrames:
    """IM-3D's re-diffusion: encode the renders, noise them to the level of strength s, denoise the
    remaining ceil(s·N) steps. s = 1 ignores the renders (a fresh orbit); small s keeps them."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[0] != config.diffusion.num_views:
        raise ValueError(
            f"got {frames.shape[0]} frames but diffusion.num_views is {config.diffusion.num_views}; "
            "render the orbit at the cameras generate_orbit returned"
        )
    return _run_orbit(reference, frames, strength, config, seed, progress, cancel)


def _run_orbit(reference, frames, strength, config, seed, progress, cancel) -> OrbitFrames:
    from im3d.diffusion.foreground import orbit_frame_mask
    from im3d.diffusion.models import EvaluationCounter

    d = config.diffusion
    size, num_views = d.image_size, d.num_views
    seed = config.pipeline.seed if seed is None else seed
    report = progress or (lambda fraction, message: None)
    check_cancel(cancel)
    report(0.0, "loading the orbit-video model")
    pipe = load_orbit_pipeline(config).pipeline

    # 1. reference on the model's canvas (already centred by the reference stage)
    rgb = _to_square(reference.rgb.permute(2, 0, 1)[None].float(), size)  # [1, 3, S, S]

    # 2. renders into model frame order
    model_azimuths = pipe.model_azimuths_deg(num_views)
    order = sorted(range(num_views), key=lambda i: model_azimuths[i])  # model index of sorted frame j
    init = None
    if frames is not None:
        sorted_frames = _to_square(frames.permute(0, 3, 1, 2).float(), size)  # [F, 3, S, S]
        init = torch.empty_like(sorted_frames)
        init[torch.tensor(order)] = sorted_frames
        init = init[None]

    # 3. denoise, with progress and cancel between steps
    n_run = steps_for_strength(d.orbit_steps, strength)
    verb = "generating" if frames is None else f"re-diffusing (s={strength:g})"

    def on_step(_pipe, i, _t, tensors):
        report(0.05 + 0.85 * (i + 1) / n_run, f"{verb} orbit: step {i + 1}/{n_run}")
        check_cancel(cancel)
        return tensors

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with EvaluationCounter(pipe.unet) as counter:
        latents = pipe(
            rgb,
            elevations_deg=[d.elevation_deg] * num_views,
            azimuths_deg=model_azimuths,
            num_inference_steps=d.orbit_steps,
            strength=strength,
            init_frames=init,
            min_guidance_scale=d.min_guidance,
            max_guidance_scale=d.max_guidance,
            guidance_profile=d.guidance_profile,
            cond_aug=d.cond_aug,
            decode_chunk_size=d.vae_decode_chunk,
            generator=generator,
            output_type="latent",
            callback_on_step_end=on_step,
        ).frames
    check_cancel(cancel)
    report(0.92, "decoding orbit frames")
    with torch.no_grad():
        video = pipe.decode(latents, d.vae_decode_chunk)[0]  # [F, 3, S, S], model order
    images = video[torch.tensor(order)].permute(0, 2, 3, 1).float().cpu().contiguous()  # [F, S, S, 3]
    # As Stability's sampler: the reference view's frame is the conditioning image itself
    images[0] = rgb[0].permute(1, 2, 0).to(images)
    masks = torch.stack([orbit_frame_mask(image, d.background_threshold) for image in images])
    cameras, azimuths = orbit_frame_cameras(config, num_views, size)
    report(1.0, f"orbit ready: {num_views} frames, {counter.count} network evaluations")
    return OrbitFrames(images, masks, cameras, azimuths, d.elevation_deg, counter.count)


def _to_square(images: Tensor, size: int) -> Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] (antialiased resize; inputs are square by construction)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


__all__ = [
    "Cancelled",
    "OrbitFrames",
    "OrbitUNetSpatioTemporalConditionModel",
    "OrbitVideoPipeline",
    "generate_orbit",
    "guidance_per_frame",
    "load_orbit_pipeline",
    "orbit_frame_cameras",
    "orbit_radius",
    "rediffuse",
    "steps_for_strength",
]
