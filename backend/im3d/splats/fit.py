"""Fit 3D Gaussians directly to multi-view images with robust image losses (IM-3D §3.2).

No score distillation, no reconstruction network: Adam on the Gaussians' parameters against
10·LPIPS + 0.2·(1 − MS-SSIM) + 1·mask (the paper's weights, from `ReconConfig`), densifying and
pruning with `gsplat.strategy.DefaultStrategy` every 50 steps. `SplatFitter.fit()` can be called
again after `set_targets()` — IM-3D's refinement rounds continue the same splats on re-diffused
frames.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from im3d.cameras import Cameras
from im3d.config import ReconConfig
from im3d.errors import PipelineError, check_cancel
from im3d.splats.losses import LossWeights, ReconstructionLoss, load_lpips, mask_iou, psnr, ssim
from im3d.splats.model import activated, init_center, init_visual_hull, scene_bounds, sh_degree_of
from im3d.splats.raster import pick_backend, rasterize


class FitDivergedError(PipelineError):
    def __init__(self, message: str):
        super().__init__("fit_diverged", message)


@dataclass
class StepInfo:
    step: int  # steps done in this fit() call
    total: int  # steps this fit() call will do
    loss: float
    terms: dict[str, float]
    num_gaussians: int
    elapsed_s: float


@dataclass
class FitResult:
    steps: int
    final_loss: float
    seconds: float
    num_gaussians: int
    rollbacks: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (global step, loss) every few steps


def resize_images(images: Tensor, size: int) -> Tensor:
    """[C,H,W,K] -> larger side `size` (antialiased), unchanged when already that size."""
    C, H, W, K = images.shape
    if max(H, W) == size:
        return images
    scale = size / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    out = F.interpolate(images.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


class SplatFitter:
    """Holds the splats, their optimisers and the densification state across fit() calls."""

    def __init__(
        self,
        config: ReconConfig,
        cameras: Cameras,
        images: Tensor,  # [C, H, W, 3] straight colour in [0, 1]
        masks: Tensor,  # [C, H, W, 1] in [0, 1]
        device: torch.device | str = "cpu",
        lpips_model: torch.nn.Module | None = None,
        splats: torch.nn.ParameterDict | None = None,
        seed: int = 0,  # the job's pipeline.seed: initialisation, view sampling, densification
    ):
        from gsplat.strategy import DefaultStrategy

        self.config = config
        self.device = torch.device(device)
        self.backend = pick_backend(self.device, config.backend)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.background = torch.tensor(config.background, dtype=torch.float32, device=self.device)
        self.set_targets(images, masks, cameras)

        center, orbit_radius = scene_bounds(cameras)
        half_fov = math.atan(0.5 * cameras.width / float(cameras.Ks[0, 0, 0]))
        # The radius of what the cameras frame: the object's scale, which sets learning rates and
        # the split/prune sizes (gsplat's "scene_scale", which for object orbits is not the orbit).
        self.scene_scale = max(orbit_radius * math.tan(half_fov), 1e-3)
        self.center = center
        if splats is None:
            splats = self._initial_splats(cameras, images, masks)
        self.splats = splats.to(self.device)
        self.optimizers = self._make_optimizers(lr_factor=1.0)

        if lpips_model is None and config.lpips_weight > 0:
            lpips_model = load_lpips(config.lpips_net, self.device)
        weights = LossWeights(config.lpips_weight, config.msssim_weight, config.mask_weight, config.l1_weight, config.l2_weight)
        self.loss_fn = ReconstructionLoss(weights, lpips_model)

        # Opacity reset is disabled: it is known not to fire reliably inside DefaultStrategy, and a
        # 1,200-step fit is too short to recover from one anyway.
        self.strategy = DefaultStrategy(
            prune_opa=config.prune_opacity,
            grow_grad2d=config.densify_grad_threshold,
            refine_every=config.densify_every,
            reset_every=10**9,
            verbose=False,
        )
        self.strategy.check_sanity(self.splats, self.optimizers)
        self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)
        self.global_step = 0
        self.rollbacks = 0
        self.lr_factor = 1.0
        self._last_good: dict | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def set_targets(self, images: Tensor, masks: Tensor, cameras: Cameras | None = None) -> None:
        """New target frames (same cameras unless given), e.g. after a re-diffusion round."""
        C = images.shape[0]
        assert images.ndim == 4 and images.shape[-1] == 3, images.shape
        assert masks.shape == (*images.shape[:3], 1), masks.shape
        if cameras is not None:
            assert len(cameras) == C, (len(cameras), C)
            self.cameras_full = cameras
        elif getattr(self, "cameras_full", None) is None or len(self.cameras_full) != C:
            raise ValueError(f"{C} target images but {len(self.cameras_full)} cameras")
        if not torch.isfinite(images).all() or not torch.isfinite(masks).all():
            raise ValueError("target images contain NaN or infinity")
        images = resize_images(images.float(), self.config.image_size)
        masks = resize_images(masks.float(), self.config.image_size)
        H, W = images.shape[1:3]
        self.cameras = self.cameras_full.resized(W, H).to(self.device)
        self.masks = masks.to(self.device)
        self.targets = (images.to(self.device) * self.masks + self.background * (1 - self.masks)).contiguous()

    def _initial_splats(self, cameras: Cameras, images: Tensor, masks: Tensor) -> torch.nn.ParameterDict:
        c = self.config
        scale = c.init_scale * self.scene_scale
        if c.init == "visual_hull":
            small = resize_images(masks.float(), min(128, max(masks.shape[1:3])))
            small_images = resize_images(images.float(), small.shape[2] if small.shape[2] >= small.shape[1] else small.shape[1])
            hull = init_visual_hull(
                c.init_points, cameras.resized(small.shape[2], small.shape[1]), small_images, small,
                scale, c.sh_degree, self.generator, search_radius=self.scene_scale, center=self.center,
            )
            if hull is not None:
                return hull
        return init_center(c.init_points, c.init_radius * self.scene_scale, scale, c.sh_degree, self.center, self.generator)

    def _make_optimizers(self, lr_factor: float) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        lrs = {
            "means": c.lr_means * self.scene_scale,
            "scales": c.lr_scales,
            "quats": c.lr_quats,
            "opacities": c.lr_opacities,
            "sh0": c.lr_colors,
            "shN": c.lr_colors / 20.0,
        }
        # One Adam per tensor: DefaultStrategy edits each optimiser's state when it splits or prunes.
        return {
            name: torch.optim.Adam([{"params": self.splats[name], "lr": lr * lr_factor, "name": name}], eps=1e-15)
            for name, lr in lrs.items()
        }

    # -- rendering and metrics ------------------------------------------------------------------

    def render(self, cameras: Cameras, backend: str | None = None) -> tuple[Tensor, Tensor]:
        """colors [C,H,W,3], alphas [C,H,W,1] of the current splats (no gradients)."""
        with torch.no_grad():
            cams = cameras.to(self.device)
            colors, alphas, _ = self._rasterize(cams, backend or self.backend)
        return colors.clamp(0, 1), alphas

    def _rasterize(self, cams: Cameras, backend: str) -> tuple[Tensor, Tensor, dict]:
        p = activated(self.splats)
        backgrounds = self.background.expand(len(cams), 3)
        return rasterize(
            p["means"], p["quats"], p["scales"], p["opacities"], p["colors"],
            cams.viewmats, cams.Ks, cams.width, cams.height,
            sh_degree=sh_degree_of(self.splats), backgrounds=backgrounds, backend=backend,
        )

    def evaluate(self, cameras: Cameras, images: Tensor, masks: Tensor) -> dict[str, float]:
        """Held-out PSNR / SSIM (over the background colour) and mask IoU at the given views."""
        images = images.to(self.device).float()
        masks = masks.to(self.device).float()
        cams = cameras.resized(images.shape[2], images.shape[1]) if (cameras.width, cameras.height) != (images.shape[2], images.shape[1]) else cameras
        colors, alphas = self.render(cams)
        targets = images * masks + self.background * (1 - masks)
        return {
            "psnr": float(psnr(colors, targets)),
            "ssim": float(ssim(colors, targets)),
            "mask_iou": float(mask_iou(alphas, masks)),
        }

    @property
    def num_gaussians(self) -> int:
        return int(self.splats["means"].shape[0])

    # -- the fitting loop -----------------------------------------------------------------------

    def fit(
        self,
        steps: int,
        on_step: Callable[[StepInfo], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        densify: bool = True,
    ) -> FitResult:
        """Run `steps` optimisation steps on the current targets.

        Densification runs between `densify_start` and `densify_stop_fraction` of this call's steps.
        A NaN/Inf loss or parameter rolls back to the last good state once and halves the learning
        rates; a second one raises `FitDivergedError` naming the step.
        """
        c = self.config
        C = len(self.cameras)
        first = self.global_step
        start_time = time.perf_counter()
        self.strategy.refine_start_iter = first + (c.densify_start if first == 0 else c.densify_every)
        self.strategy.refine_stop_iter = first + int(c.densify_stop_fraction * steps) if densify else first
        views = C if c.views_per_step == 0 else min(c.views_per_step, C)
        means_lr0 = c.lr_means * self.scene_scale  # times self.lr_factor, read every step: a rollback halves it
        if self._params_finite():
            self._last_good = self._snapshot()
        history: list[tuple[int, float]] = []
        loss_value, terms = float("nan"), {}
        # gsplat's DefaultStrategy draws its split samples from the global torch RNG: seed it from
        # the job's seed (and the step, so each fit() call of a job gets its own stream).
        torch.manual_seed((self.seed * 1_000_003 + first) % 2**63)

        step = 0
        while step < steps:
            check_cancel(cancel)
            # Positions anneal to 1% of their learning rate over the call, as in gsplat's trainer.
            for group in self.optimizers["means"].param_groups:
                group["lr"] = means_lr0 * self.lr_factor * 0.01 ** (step / max(steps, 1))
            index = torch.randperm(C, generator=self.generator)[:views] if views < C else torch.arange(C)
            cams = self.cameras[index.tolist()]
            colors, alphas, info = self._rasterize(cams, self.backend)
            loss, terms = self.loss_fn(colors, alphas, self.targets[index], self.masks[index])
            loss_value = float(loss.detach())

            if not math.isfinite(loss_value) or not self._params_finite():
                self._recover(first + step)
                continue  # redo the same step from the restored state

            self.strategy.step_pre_backward(self.splats, self.optimizers, self.strategy_state, self.global_step, info)
            loss.backward()
            for optimizer in self.optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.strategy.step_post_backward(self.splats, self.optimizers, self.strategy_state, self.global_step, info, packed=False)
            self._enforce_budget()

            if not self._params_finite():
                self._recover(first + step)
                continue
            step += 1
            self.global_step += 1
            if step % 25 == 0 or step == steps:
                history.append((self.global_step, loss_value))
            if step % c.densify_every == 0:
                self._last_good = self._snapshot()
            if on_step is not None:
                on_step(StepInfo(step, steps, loss_value, terms, self.num_gaussians, time.perf_counter() - start_time))

        return FitResult(steps, loss_value, time.perf_counter() - start_time, self.num_gaussians, self.rollbacks, history)

    # -- robustness -----------------------------------------------------------------------------

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.splats.values())

    def _snapshot(self) -> dict:
        return {
            "splats": {k: v.detach().clone() for k, v in self.splats.items()},
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.optimizers.items()},
            "strategy": {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.strategy_state.items()},
        }

    def _recover(self, step: int) -> None:
        snapshot = self._last_good
        if self.rollbacks >= 1 or snapshot is None:
            raise FitDivergedError(
                f"the fit produced NaN/Inf again at step {step} after rolling back and halving the learning rates; "
                "check the input images and cameras, or lower recon.lr_* in the config"
            )
        self.rollbacks += 1
        self.lr_factor *= 0.5
        for name, value in snapshot["splats"].items():
            self.splats[name] = torch.nn.Parameter(value.clone())
        self.optimizers = self._make_optimizers(self.lr_factor)
        for name, optimizer in self.optimizers.items():
            state = snapshot["optimizers"][name]
            state["param_groups"][0]["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.load_state_dict(state)
        self.strategy_state = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in snapshot["strategy"].items()}

    def _enforce_budget(self) -> None:
        excess = self.num_gaussians - self.config.max_gaussians
        if excess <= 0:
            return
        from gsplat.strategy.ops import remove

        order = torch.argsort(self.splats["opacities"].detach())
        mask = torch.zeros(self.num_gaussians, dtype=torch.bool, device=self.device)
        mask[order[:excess]] = True
        remove(params=self.splats, optimizers=self.optimizers, state=self.strategy_state, mask=mask)
