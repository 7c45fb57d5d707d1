"""Robustness benchmark: do IM-3D's image-level losses tolerate views that disagree a little?

IM-3D (§3.2) fits splats to generated frames that are not exactly 3D-consistent and argues that
perceptual/structural losses (LPIPS + MS-SSIM) tolerate that better than per-pixel L2. This script
perturbs the 16 ground-truth training views so they disagree — each view gets its own small
shift, rotation (image and mask together) and colour jitter (image only) — fits with

  * L2:    recon.l2_weight=1, mask 1, everything else 0
  * paper: 0.2·(1 − MS-SSIM) + 1·mask + 1·L1 (LPIPS off: no backbone weights exist offline)

and scores both against the clean held-out views. Prints a markdown table, saves a PNG plot.

    backend/.venv/bin/python bench/bench_robustness.py --object suzanne --strengths 0,1,2 --steps 400
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_reconstruct import DEFAULT_DATA, ensure_dataset  # noqa: E402

# At strength 1: up to this many pixels of shift (at 128 px), degrees of rotation, and colour gain.
SHIFT_PX_AT_128 = 2.0
ROTATION_DEG = 2.0
BRIGHTNESS = 0.08  # multiplicative, per view
CHANNEL_GAIN = 0.04  # multiplicative, per view and channel

LOSSES = {
    "L2 + mask": ["recon.lpips_weight=0", "recon.msssim_weight=0", "recon.l1_weight=0", "recon.l2_weight=1", "recon.mask_weight=1"],
    "MS-SSIM + mask + L1 (paper, no LPIPS)": [
        "recon.lpips_weight=0", "recon.msssim_weight=0.2", "recon.l1_weight=1", "recon.l2_weight=0", "recon.mask_weight=1",
    ],
}


def perturb_views(
    images: torch.Tensor,  # [C, H, W, 3] in [0, 1]
    masks: torch.Tensor,  # [C, H, W, 1] in [0, 1]
    strength: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view independently shifted, rotated and colour-jittered; uniform in ±strength·limits."""
    from torchvision.transforms.v2 import functional as TF

    if strength == 0:
        return images.clone(), masks.clone()
    C, H, W, _ = images.shape
    out_images, out_masks = [], []
    uniform = lambda *shape: (torch.rand(*shape, generator=generator) * 2 - 1) * strength  # noqa: E731
    for view in range(C):
        shift = (uniform(2) * SHIFT_PX_AT_128 * W / 128).tolist()
        angle = float(uniform(1)) * ROTATION_DEG
        # warp premultiplied colour and alpha together so the object's edge stays consistent
        rgba = torch.cat([images[view] * masks[view], masks[view]], dim=-1).permute(2, 0, 1)
        warped = TF.affine(rgba, angle=angle, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        alpha = warped[3:].clamp(0, 1)
        colour = (warped[:3] / alpha.clamp_min(1e-4)).clamp(0, 1)
        gain = (1 + float(uniform(1)) * BRIGHTNESS) * (1 + uniform(3) * CHANNEL_GAIN)
        colour = (colour * gain.view(3, 1, 1)).clamp(0, 1)
        out_images.append(colour.permute(1, 2, 0))
        out_masks.append(alpha.permute(1, 2, 0))
    return torch.stack(out_images), torch.stack(out_masks)


def fit_and_score(preset: str, assignments: list[str], steps: int, train, test, images, masks) -> dict:
    from im3d.config import load_config
    from im3d.splats.fit import SplatFitter

    config = load_config(preset, assignments=assignments).recon
    start = time.perf_counter()
    fitter = SplatFitter(config, train.cameras, images, masks, device="cpu")
    fitter.fit(steps)
    scores = fitter.evaluate(test.cameras, test.images, test.masks)
    return {**scores, "seconds": time.perf_counter() - start, "gaussians": fitter.num_gaussians}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for loss in LOSSES:
        runs = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["strength"])
        x = [r["strength"] for r in runs]
        axes[0].plot(x, [r["psnr"] for r in runs], marker="o", label=loss)
        axes[1].plot(x, [r["mask_iou"] for r in runs], marker="o", label=loss)
    axes[0].set_ylabel("held-out PSNR (dB)")
    axes[1].set_ylabel("held-out mask IoU")
    for axis in axes:
        axis.set_xlabel(f"view disagreement (1 = ±{SHIFT_PX_AT_128:g} px, ±{ROTATION_DEG:g}°, ±{BRIGHTNESS:.0%} brightness)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object", default="suzanne", help="object of bench/render_datasets.py")
    parser.add_argument("--preset", default="fast", help="config preset the fits start from")
    parser.add_argument("--init", choices=["center", "visual_hull"], default="center", help="recon.init of every fit")
    parser.add_argument("--strengths", default="0,1,2", help="comma-separated perturbation strengths (0 = clean views)")
    parser.add_argument("--steps", type=int, default=0, help="optimisation steps per fit (0: the preset's)")
    parser.add_argument("--size", type=int, default=128, help="ground-truth image side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where ground-truth datasets are cached")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "reconstruction_robustness.png", help="PNG plot path")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)

    from im3d.cameras import read_transforms

    torch.set_num_threads(args.threads)
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    data = ensure_dataset(args.data, args.object, args.size)
    train = read_transforms(data, "train")
    test = read_transforms(data, "test")
    common = ["recon.backend=cpu", f"recon.image_size={args.size}", f"recon.init={args.init}"]
    steps = args.steps or __import__("im3d.config", fromlist=["x"]).load_config(args.preset).recon.steps

    rows = []
    for strength in strengths:
        images, masks = perturb_views(train.images, train.masks, strength, torch.Generator().manual_seed(1234))
        # how much the perturbed training views disagree with the clean ones they came from
        clean = train.images * train.masks + (1 - train.masks)
        noisy = images * masks + (1 - masks)
        input_psnr = float(-10 * torch.log10(((clean - noisy) ** 2).mean().clamp_min(1e-12)))
        for loss, assignments in LOSSES.items():
            scores = fit_and_score(args.preset, common + assignments, steps, train, test, images, masks)
            row = {"strength": strength, "loss": loss, "input_psnr": input_psnr, **scores}
            rows.append(row)
            print(f"[bench] strength {strength:g} {loss}: {scores['psnr']:.2f} dB, IoU {scores['mask_iou']:.3f}, {scores['seconds']:.0f} s", file=sys.stderr, flush=True)

    lines = [
        "| disagreement | perturbed vs clean training views (PSNR dB) | loss | held-out PSNR (dB) | SSIM | mask IoU | seconds |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        input_psnr = "∞ (clean)" if math.isinf(r["input_psnr"]) or r["strength"] == 0 else f"{r['input_psnr']:.1f}"
        lines.append(
            f"| {r['strength']:g} | {input_psnr} | {r['loss']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['mask_iou']:.3f} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    title = f"{args.object}, preset {args.preset}, init {args.init}, {steps} steps, {args.size}² — scored on clean held-out views"
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
        args.markdown.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
