"""Image losses of IM-3D's robust reconstruction (paper §3.2): LPIPS, MS-SSIM, mask, L1/L2.

LPIPS uses the `lpips` package's linear heads (shipped inside the package) on a torchvision
backbone whose weights come from the torch hub cache, exactly where torchvision itself would put
them. Nothing is ever downloaded here: a missing backbone file is a `MissingWeightsError` that says
which file to put where.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from im3d.errors import ModelNotFoundError

# torchvision's file names for the ImageNet weights LPIPS was trained on.
BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


class MissingWeightsError(ModelNotFoundError):
    """The LPIPS backbone weights are not on disk."""


def backbone_path(net: str) -> Path:
    """Where torchvision keeps the backbone weights: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net][0]


def load_lpips(net: str = "vgg", device: torch.device | str = "cpu", weights: str | Path | None = None) -> torch.nn.Module:
    """An `lpips.LPIPS` model with its backbone loaded from `weights` or the torch hub cache.

    Only the backbone's `features.*` tensors are read (with `weights_only=True`, so no code runs).
    """
    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; use 'vgg' or 'alex'")
    path = Path(weights) if weights else backbone_path(net)
    if not path.is_file():
        file_name, url = BACKBONE_FILES[net]
        raise MissingWeightsError(
            f"LPIPS-{net} needs the torchvision ImageNet backbone weights {file_name}, looked for at {path}. "
            f"Get it with `im3d models pull lpips-{net}` (or Blender: Preferences > Models > Download Models; it "
            f"fetches {url}, hash-checked), or switch LPIPS off with recon.lpips_weight=0."
        )
    with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation, from inside lpips
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    loaded = 0
    for slice_name in [f"slice{i}" for i in range(1, model.net.N_slices + 1)]:
        for index, layer in getattr(model.net, slice_name).named_children():
            for param_name, param in layer.named_parameters(recurse=False):
                key = f"{index}.{param_name}"
                if key not in features or features[key].shape != param.shape:
                    raise MissingWeightsError(f"{path} is not a torchvision {net} checkpoint: '{key}' missing or mis-shaped")
                param.data.copy_(features[key])
                loaded += 1
    if loaded == 0:  # pragma: no cover - every backbone has parameters
        raise MissingWeightsError(f"{path} holds no backbone parameters")
    model.eval().requires_grad_(False)
    return model.to(device)


def msssim_settings(height: int, width: int) -> tuple[int, list[float]]:
    """Window size and scale weights of MS-SSIM that fit an image of this size.

    pytorch-msssim needs the smaller side > (win_size - 1) * 2**(scales - 1); instead of crashing on
    small images we shrink the window (odd, >= 3), then drop the coarsest scales, renormalising the
    standard weights (Wang et al. 2003).
    """
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    side = min(height, width)
    for scales in range(5, 0, -1):
        for win in (11, 9, 7, 5, 3):
            if side > (win - 1) * 2 ** (scales - 1):
                w = weights[:scales]
                total = sum(w)
                return win, [x / total for x in w]
    raise ValueError(f"images of {width}x{height} are too small for MS-SSIM (need at least 3x3)")


def ms_ssim(images: Tensor, targets: Tensor) -> Tensor:
    """Mean MS-SSIM of images [B,H,W,3] against targets [B,H,W,3] in [0, 1].

    pytorch-msssim's `ms_ssim` insists on five scales (it asserts the image is > 160 px for an
    11-px window); this runs its per-scale `_ssim` over the scales that fit (`msssim_settings`).
    """
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    assert images.shape == targets.shape and images.shape[-1] == 3, (images.shape, targets.shape)
    x, y = images.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
    win_size, weights = msssim_settings(x.shape[2], x.shape[3])
    win = _fspecial_gauss_1d(win_size, 1.5).to(x).repeat(3, 1, 1, 1)
    mcs = []
    for level in range(len(weights)):
        ssim_per_channel, cs = _ssim(x, y, win=win, data_range=1.0, size_average=False, K=(0.01, 0.03))
        if level < len(weights) - 1:
            mcs.append(torch.relu(cs))
            padding = [n % 2 for n in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    stacked = torch.stack(mcs + [torch.relu(ssim_per_channel)], dim=0)  # [levels, B, 3]
    return torch.prod(stacked ** x.new_tensor(weights).view(-1, 1, 1), dim=0).mean()


def ssim(images: Tensor, targets: Tensor) -> Tensor:
    """Mean single-scale SSIM (11x11 Gaussian window when it fits) of [B,H,W,3] images."""
    from pytorch_msssim import ssim as _ssim

    x, y = images.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
    win = 11 if min(x.shape[2:]) > 11 else max(3, (min(x.shape[2:]) // 2) * 2 - 1)
    return _ssim(x, y, data_range=1.0, win_size=win, size_average=True)


def psnr(images: Tensor, targets: Tensor) -> Tensor:
    mse = F.mse_loss(images, targets)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def mask_iou(alphas: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    a, m = alphas > threshold, masks > threshold
    union = (a | m).sum()
    return (a & m).sum() / union.clamp_min(1) if union > 0 else torch.tensor(1.0)


@dataclass
class LossWeights:
    lpips: float = 10.0
    msssim: float = 0.2
    mask: float = 1.0
    l1: float = 0.0
    l2: float = 0.0


class ReconstructionLoss(torch.nn.Module):
    """w_lpips·LPIPS + w_msssim·(1 − MS-SSIM) + w_mask·‖α − mask‖² + w_l1·L1 + w_l2·L2 (paper: 10, 0.2, 1)."""

    def __init__(self, weights: LossWeights, lpips_model: torch.nn.Module | None = None):
        super().__init__()
        if weights.lpips > 0 and lpips_model is None:
            raise ValueError("an LPIPS model is needed when the LPIPS weight is positive")
        self.weights = weights
        self.lpips_model = lpips_model if weights.lpips > 0 else None

    def forward(self, colors: Tensor, alphas: Tensor, targets: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, float]]:
        """colors/targets [B,H,W,3], alphas/masks [B,H,W,1] -> (total loss, per-term values)."""
        assert colors.shape == targets.shape, (colors.shape, targets.shape)
        assert alphas.shape == masks.shape, (alphas.shape, masks.shape)
        w = self.weights
        terms: dict[str, Tensor] = {}
        if self.lpips_model is not None:
            x, y = colors.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
            terms["lpips"] = self.lpips_model(x, y, normalize=True).mean()
        if w.msssim > 0:
            terms["msssim"] = 1.0 - ms_ssim(colors, targets)
        if w.mask > 0:
            terms["mask"] = F.mse_loss(alphas, masks)
        if w.l1 > 0:
            terms["l1"] = F.l1_loss(colors, targets)
        if w.l2 > 0:
            terms["l2"] = F.mse_loss(colors, targets)
        total = sum(getattr(w, name) * value for name, value in terms.items())
        if not isinstance(total, Tensor):
            raise ValueError("all loss weights are zero: nothing to fit")
        return total, {name: float(value.detach()) for name, value in terms.items()}
