"""Foreground mask and centring of a single-object image.

The text-to-image stage prompts for one object on a plain background, so the default mask is a
background-colour segmentation: the background colour is the median of the image border, a pixel
is foreground when any channel differs from it by more than `threshold`; holes are filled and
specks (components under 5 % of the largest one) dropped. An RGBA input keeps its own alpha.
Orbit frames' masks (`orbit_frame_mask`) also keep the object's light parts where the background
is clean, and get soft edges (`soften_edges`): each pixel the outline crosses takes the share of
it the object covers, read off its colour.
The object is then cropped to its mask's bounding box and scaled so that its longer side spans
`fill` of a square canvas, centred, on white (SV3D's preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from im3d.errors import PipelineError


@dataclass
class ReferenceImage:
    rgb: Tensor  # [H, W, 3] float in [0, 1], object centred on white
    mask: Tensor  # [H, W, 1] float in [0, 1]
    evaluations: int = 0  # network evaluations spent making it (0 for a user image)

    def __post_init__(self) -> None:
        H, W = self.rgb.shape[:2]
        assert self.rgb.shape == (H, W, 3), self.rgb.shape
        assert self.mask.shape == (H, W, 1), self.mask.shape


# An orbit frame (`orbit_frame`) on a clean background (a generated frame's white) is told apart
# from it more finely, at LIGHT_MARGIN times the border's 99th percentile colour distance from its
# median, at least LIGHT_MIN:
# - Parts of the object closer to the background than the threshold are kept (the cow's off-white
#   patches, 0.05 from white: half of its pixels). Only parts over two pixels wide: at that level
#   the outline would also take in the faint fringe of every anti-aliased edge, which
#   `soften_edges` reads as the object's.
# - Holes mostly of plain background are what the object lets the background show through (a
#   torus' hole, the gaps of a chair's back), not light parts: they stay open.
# Not for a reference image: the views' hull is cut by any frame that drops a part and barely grown
# by one that takes in a faint shadow, while a reference image's mask sets its crop.
LIGHT_MARGIN = 2.0
LIGHT_MIN = 0.02
SEE_THROUGH = 0.5  # share of a hole's pixels within the light level of the background that keeps it open


def segment_background_colour(
    image: Tensor,  # [H, W, 3] in [0, 1]
    threshold: float = 0.08,
    min_component_fraction: float = 0.05,
    orbit_frame: bool = False,  # keep light parts and see-through holes where the background is clean (above)
) -> Tensor:  # [H, W, 1] float {0, 1}
    assert image.ndim == 3 and image.shape[-1] == 3, image.shape
    pixels = image.detach().float().cpu().numpy()
    background = _background_colour(pixels)
    distance = np.abs(pixels - background).max(axis=-1)
    foreground = distance > threshold
    level = max(LIGHT_MIN, LIGHT_MARGIN * _background_noise(pixels, background))
    fine = orbit_frame and level < threshold
    if fine:
        light = ndimage.binary_opening((distance > level) & ~foreground, np.ones((3, 3), bool))
        foreground |= ndimage.binary_dilation(light, mask=distance > level)  # the corners the opening took
    filled = ndimage.binary_fill_holes(foreground)
    if fine:
        holes, count = ndimage.label(filled & ~foreground)
        if count:
            clear = ndimage.mean(distance <= level, holes, index=np.arange(1, count + 1))  # [count]
            filled &= ~np.isin(holes, np.flatnonzero(clear >= SEE_THROUGH) + 1)
    foreground = filled
    labels, count = ndimage.label(foreground)
    if count > 1:
        sizes = ndimage.sum(foreground, labels, index=np.arange(1, count + 1))
        keep = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
        foreground = np.isin(labels, keep)
    return torch.from_numpy(foreground.astype(np.float32))[..., None]


def _border(pixels: np.ndarray) -> np.ndarray:  # [H, W, 3] -> [2H+2W, 3]
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _background_colour(pixels: np.ndarray) -> np.ndarray:  # [H, W, 3] -> [3]
    return np.median(_border(pixels), axis=0)


def _background_noise(pixels: np.ndarray, background: np.ndarray) -> float:
    """The border's 99th percentile colour distance (largest channel) from the background colour."""
    return float(np.quantile(np.abs(_border(pixels) - background).max(axis=-1), 0.99))


# Below this colour distance between the object just inside its edge and the background, a
# pixel's colour says too little about how much of it the object covers: the edge stays binary.
EDGE_CONTRAST = 0.15
# An edge is softened only where plain background (within CLEAR_BACKGROUND of its colour) lies
# within CLEAR_PIXELS of it. Where the segmentation cut through a light part of the object (its
# colour within the threshold of the background), what lies outside is more object: its edge is
# no outline, and softening it would widen the hole.
CLEAR_BACKGROUND = 0.02
CLEAR_PIXELS = 3.0


def soften_edges(
    image: Tensor,  # [H, W, 3] in [0, 1], the object on a plain background
    mask: Tensor,  # [H, W, 1] {0, 1}, segment_background_colour's
    contrast: float = EDGE_CONTRAST,
) -> Tensor:  # [H, W, 1] float in [0, 1]
    """The mask with each pixel its edge crosses (one either side) given the share of it the object
    covers, read off its colour: how far it lies from the background toward the object's colour
    just inside (the nearest pixel two in). A binary mask counts every pixel the object touches
    past the threshold, so its outline sits ~0.4 pixel outside the true one, and the views' hull,
    the minimum over them, comes out that much too fat (docs/benchmarks.md, "Soft edges on
    generated frames' masks")."""
    inside = mask[..., 0].detach().cpu().numpy() > 0.5
    core = ndimage.binary_erosion(inside, iterations=2)
    if not core.any():
        return mask.float()
    pixels = image.detach().float().cpu().numpy().astype(np.float64)
    background = _background_colour(pixels)
    _, (rows, cols) = ndimage.distance_transform_edt(~core, return_indices=True)
    towards = pixels[rows, cols] - background  # [H, W, 3] the nearest core pixel's colour, from the background
    reach = (towards**2).sum(-1)
    coverage = np.clip(((pixels - background) * towards).sum(-1) / np.maximum(reach, 1e-12), 0.0, 1.0)
    clear = ~inside & (np.abs(pixels - background).max(axis=-1) <= CLEAR_BACKGROUND)
    near_clear = ndimage.distance_transform_edt(~clear) <= CLEAR_PIXELS if clear.any() else np.zeros_like(inside)
    edge = ndimage.binary_dilation(inside) & ~ndimage.binary_erosion(inside) & (np.sqrt(reach) > contrast) & near_clear
    out = np.where(edge, coverage, inside.astype(np.float64))
    return torch.from_numpy(out.astype(np.float32))[..., None]


def orbit_frame_mask(
    image: Tensor,  # [H, W, 3] in [0, 1], a generated frame: the object on a plain background
    threshold: float = 0.08,  # diffusion.background_threshold
) -> Tensor:  # [H, W, 1] float in [0, 1]
    """An orbit frame's mask: the background-colour segmentation with its light parts and
    see-through holes, soft edges."""
    return soften_edges(image, segment_background_colour(image, threshold, orbit_frame=True))


def centre_object(
    rgb: Tensor,  # [H, W, 3] in [0, 1]
    mask: Tensor,  # [H, W, 1] in [0, 1]
    size: int,
    fill: float = 0.85,
    background: float = 1.0,
) -> tuple[Tensor, Tensor]:  # [size, size, 3], [size, size, 1]
    """Crop to the mask's bounding box, scale the longer side to `fill`·size, centre on `background`."""
    assert rgb.shape[:2] == mask.shape[:2] and mask.shape[-1] == 1, (rgb.shape, mask.shape)
    rows = torch.nonzero(mask[..., 0].amax(dim=1) > 0.5).flatten()
    cols = torch.nonzero(mask[..., 0].amax(dim=0) > 0.5).flatten()
    if rows.numel() == 0:
        # A user-facing outcome (a blank image, or a text-to-image draw of plain background), not a bug.
        raise PipelineError(
            "no_object_found",
            "no object found in the reference image (its foreground mask is empty); use an image of one "
            "object on a plain background, or an RGBA image whose alpha marks the object"
        )
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    rgba = torch.cat([rgb.float(), mask.float()], dim=-1)[top:bottom, left:right]  # [h, w, 4]
    h, w = rgba.shape[:2]
    scale = fill * size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(
        rgba.permute(2, 0, 1)[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )[0].permute(1, 2, 0).clamp(0, 1)
    canvas = torch.zeros(size, size, 4)
    y0, x0 = (size - new_h) // 2, (size - new_w) // 2
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = resized
    alpha = canvas[..., 3:]
    # Colours were not premultiplied before resampling: composite with the resampled alpha.
    out_rgb = canvas[..., :3] * alpha + background * (1.0 - alpha)
    return out_rgb, alpha


def image_to_tensor(image: Any) -> Tensor:
    """PIL image, numpy array (uint8 or float) or tensor -> [H, W, C] float in [0, 1], C in {3, 4}."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    tensor = tensor.float()
    if tensor.ndim != 3 or tensor.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA image [H, W, 3|4], got shape {tuple(tensor.shape)}")
    return tensor.clamp(0, 1)


def prepare_reference(image: Any, config: Any, evaluations: int = 0) -> ReferenceImage:
    """Any single-object image -> a `ReferenceImage` centred at `diffusion.image_size`."""
    d = config.diffusion
    pixels = image_to_tensor(image)
    if pixels.shape[-1] == 4:
        rgb, mask = pixels[..., :3], pixels[..., 3:]
    else:
        rgb, mask = pixels, segment_background_colour(pixels, d.background_threshold)
    rgb, mask = centre_object(rgb, mask, d.image_size, d.frame_fill)
    return ReferenceImage(rgb, mask, evaluations)
