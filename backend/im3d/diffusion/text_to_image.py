"""Text -> reference image with any diffusers text-to-image pipeline (SDXL-Turbo, SD 3.5, FLUX ...).

The pipeline class is whatever the model folder's `model_index.json` names, loaded through
`DiffusionPipeline.from_pretrained`; only arguments its `__call__` accepts are passed (FLUX has
no negative prompt, turbo models run without guidance). The prompt is wrapped so the model draws
one whole object, centred, on a plain white background, which the background-colour
segmentation in `foreground.py` relies on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from im3d.diffusion.foreground import ReferenceImage, image_to_tensor, prepare_reference
from im3d.errors import check_cancel

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

# Side length a text-to-image model was trained at, where its pipeline's default differs
# (SDXL-Turbo keeps SDXL's 1024² default but was distilled at 512²; SD-Turbo likewise).
TRAINED_SIZES = {"sdxl-turbo": 512, "sd-turbo": 512}

OBJECT_PROMPT = "{prompt}, a single object, whole object in view, centered, isolated on a plain white background, studio lighting, high detail"
OBJECT_NEGATIVE_PROMPT = "multiple objects, cropped, cut off, out of frame, text, watermark, busy background, scenery, ground shadow, blurry"


def object_prompts(prompt: str, negative_prompt: str = "") -> tuple[str, str]:
    """Wrap a user's prompt for a single centred object on a plain background."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; describe the object to generate")
    negative = OBJECT_NEGATIVE_PROMPT + (f", {negative_prompt.strip()}" if negative_prompt and negative_prompt.strip() else "")
    return OBJECT_PROMPT.format(prompt=prompt.strip()), negative


def trained_size(model_id: str) -> int:
    """The side `model_id` was trained at when its pipeline would default to another (0: use the default)."""
    name = model_id.rstrip("/").split("/")[-1].lower()
    return next((side for key, side in TRAINED_SIZES.items() if name == key or name.startswith(key + "-") or name.endswith("--" + key)), 0)


def load_text_to_image_pipeline(config: Any):
    from im3d.diffusion.models import load_configured_pipeline

    return load_configured_pipeline(config, config.diffusion.text_to_image_model, "text-to-image model")


def generate_reference_image(
    prompt: str,
    negative_prompt: str = "",
    config: Any = None,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> ReferenceImage:
    """Prompt -> a centred single-object `ReferenceImage` at `diffusion.image_size`."""
    from im3d.diffusion.models import EvaluationCounter, denoiser_of

    if config is None:
        from im3d.config import Config

        config = Config()
    d = config.diffusion
    seed = config.pipeline.seed if seed is None else seed
    report = progress or (lambda fraction, message: None)
    full_prompt, full_negative = object_prompts(prompt, negative_prompt)
    check_cancel(cancel)
    report(0.0, "loading the text-to-image model")
    pipe = load_text_to_image_pipeline(config).pipeline

    # 1. arguments this pipeline understands
    accepted = set(inspect.signature(pipe.__call__).parameters)
    steps = d.text_to_image_steps
    kwargs: dict[str, Any] = {"prompt": full_prompt, "num_inference_steps": steps, "output_type": "pt"}
    if "guidance_scale" in accepted:
        kwargs["guidance_scale"] = d.text_to_image_guidance
    if "negative_prompt" in accepted and d.text_to_image_guidance > 1.0:
        kwargs["negative_prompt"] = full_negative
    size = d.text_to_image_size or trained_size(d.text_to_image_model)
    if size and {"height", "width"} <= accepted:
        kwargs["height"] = kwargs["width"] = size
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))

    # 2. progress and cancel between steps
    if "callback_on_step_end" in accepted:

        def on_step(_pipe, i, _t, tensors):
            report(0.05 + 0.85 * (i + 1) / steps, f"reference image: step {i + 1}/{steps}")
            check_cancel(cancel)
            return tensors

        kwargs["callback_on_step_end"] = on_step

    # 3. generate, then mask and centre the object
    with EvaluationCounter(denoiser_of(pipe)) as counter, torch.no_grad():
        images = pipe(**kwargs).images  # [1, 3, H, W] in [0, 1]
    check_cancel(cancel)
    if isinstance(images, torch.Tensor):
        image = images[0].permute(1, 2, 0) if images.shape[1] == 3 else images[0]  # [H, W, 3]
    else:  # pipelines that ignore output_type="pt" return PIL images or arrays
        image = image_to_tensor(images[0])
    report(0.95, "segmenting and centring the object")
    reference = prepare_reference(image.float().cpu().clamp(0, 1), config, evaluations=counter.count)
    report(1.0, f"reference image ready ({counter.count} network evaluations)")
    return reference
