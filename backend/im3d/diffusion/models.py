"""Finding, loading and keeping warm the generative models.

Models are never downloaded at job time: a model id is resolved to a local folder in the
diffusers layout (a `model_index.json` beside one sub-folder per component), looked for

1. as a path (absolute, or relative to the working directory),
2. under `diffusion.models_dir` as `<models_dir>/<id>`, `<models_dir>/<org>--<name>` and
   `<models_dir>/<name>`,
3. in the Hugging Face hub cache (`HF_HUB_CACHE`, what `im3d models pull` / `hf download <id>` fill),

except Stability's single-file SV3D ids (`stabilityai/sv3d`, `stabilityai/sv3d:sv3d_u`), which resolve
to their conversion under `im3d.weights.models_root()` (what `im3d models pull` writes),

and loaded from that folder with `local_files_only=True` and `use_safetensors=True`, so a
missing model is a `ModelNotFoundError` within milliseconds that names every place it looked
and how to get the model, never a network wait and never a pickle load.

Loaded pipelines live in a per-process cache keyed by (folder, device, dtype, offload) and stay
warm between jobs; `release_models()` drops them.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from im3d.device import resolve_device
from im3d.errors import ModelNotFoundError

DOCS_HINT = "see docs/diffusion.md"


# ----------------------------------------------------------------------------------------------
# Device and precision


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs and MPS, fp32 on the CPU."""
    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Resolution


def hf_cache_dir() -> Path:
    from im3d.weights.registry import hf_cache_dir as cache_dir

    return cache_dir()


def resolve_model_folder(model_id: str, models_dir: str = "", what: str = "model") -> Path:
    """A local diffusers-layout folder for `model_id`, or a `ModelNotFoundError` saying where it looked."""
    from im3d.weights.registry import converted_folder, sgm_source

    if not model_id or not model_id.strip():
        raise ModelNotFoundError(f"no {what} is configured (empty model id); {DOCS_HINT}")
    looked: list[str] = []

    def usable(folder: Path) -> bool:
        if (folder / "model_index.json").is_file():
            return True
        if folder.is_dir():
            looked.append(f"{folder} (a folder, but without model_index.json: not the diffusers layout)")
        else:
            looked.append(f"{folder} (no such folder)")
        return False

    if sgm_source(model_id) is not None:  # Stability's single-file SV3D: its conversion is the model
        folder = converted_folder(model_id, models_dir)
        if usable(folder):
            return folder.resolve()
        repo, file_name, _ = sgm_source(model_id)
        raise ModelNotFoundError(
            f"{what} '{model_id}' (Stability's {repo}/{file_name}, converted to the diffusers layout) was not found at "
            f"{folder}. Get it with `im3d models pull orbit-video` (downloads and converts; the repository is gated: "
            f"accept the licence at https://huggingface.co/{repo} first), or convert a downloaded file with "
            f"`im3d models convert {file_name} --out {folder}`; {DOCS_HINT}."
        )
    direct = Path(model_id).expanduser()
    looks_like_path = direct.is_absolute() or direct.exists() or model_id.startswith((".", "~"))
    if looks_like_path and usable(direct):
        return direct.resolve()
    if models_dir:
        root = Path(models_dir).expanduser()
        name = model_id.split("/")[-1]
        for candidate in dict.fromkeys([root / model_id, root / model_id.replace("/", "--"), root / name]):
            if usable(candidate):
                return candidate.resolve()
    if "/" in model_id and not direct.is_absolute() and model_id.count("/") == 1:
        cached = _hf_cache_snapshot(model_id, looked)
        if cached is not None:
            return cached
    else:
        looked.append(f"Hugging Face cache {hf_cache_dir()} (skipped: {model_id!r} is not an 'org/name' id)")
    raise ModelNotFoundError(_not_found_message(model_id, models_dir, what, looked))


def _hf_cache_snapshot(repo_id: str, looked: list[str]) -> Path | None:
    from im3d.weights.registry import hf_repo_cache_folder, hf_snapshot

    folder = hf_snapshot(repo_id)  # the snapshot at `main` that holds model_index.json
    if folder is not None:
        return folder
    where = hf_repo_cache_folder(repo_id)
    if where.is_dir():
        looked.append(f"Hugging Face cache {where} (downloaded only in part, or without model_index.json: not the diffusers layout)")
    else:
        looked.append(f"Hugging Face cache {where} (not downloaded)")
    return None


def _not_found_message(model_id: str, models_dir: str, what: str, looked: list[str]) -> str:
    target = Path(models_dir or "~/im3d-models").expanduser() / model_id.replace("/", "--")
    places = "\n".join(f"  - {place}" for place in looked)
    return (
        f"{what} '{model_id}' was not found locally (models are never downloaded during a job).\n"
        f"Looked in:\n{places}\n"
        f"To get it: `im3d models pull` (fetches only the files the project loads; or the Download Models "
        f"button in Blender's add-on preferences), or `hf download {model_id}` (fills the Hugging Face "
        f"cache) or `hf download {model_id} --local-dir {target}` and set diffusion.models_dir; "
        f"or point the config at a local folder in the diffusers layout (model_index.json); {DOCS_HINT}."
    )


def weights_variant(folder: Path) -> str | None:
    """"fp16" when a component holds only fp16-variant weights (what `im3d models pull` fetches)."""
    for component in folder.iterdir() if folder.is_dir() else []:
        if not component.is_dir():
            continue
        names = [p.name for p in component.glob("*.safetensors")]
        if names and all(".fp16." in n or ".fp16-" in n for n in names):
            return "fp16"
    return None


# ----------------------------------------------------------------------------------------------
# Loading and the warm cache


@dataclass
class LoadedModel:
    pipeline: Any  # a diffusers DiffusionPipeline
    folder: Path
    device: torch.device
    dtype: torch.dtype
    cpu_offload: bool


_CACHE: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def load_configured_pipeline(config: Any, model_id: str, what: str, pipeline_class: Any = None) -> LoadedModel:
    """The warm pipeline for `model_id`, on the config's device and dtype (looked up as `resolve_model_folder` says)."""
    d = config.diffusion
    folder = resolve_model_folder(model_id, d.models_dir, what=what)
    device = resolve_device(config.pipeline.device)
    return load_pipeline(folder, device, resolve_dtype(d.dtype, device), d.cpu_offload, pipeline_class)


def load_pipeline(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    cpu_offload: bool,
    pipeline_class: Any = None,
    loader: Callable[[Path, torch.dtype], Any] | None = None,
) -> LoadedModel:
    """Load the pipeline in `folder` once per process; later calls return the warm one.

    `loader(folder, dtype)` builds the pipeline (defaults to `pipeline_class.from_pretrained`,
    itself `DiffusionPipeline` by default: the class named in model_index.json).
    """
    key = (str(folder), str(device), str(dtype), bool(cpu_offload), getattr(pipeline_class, "__name__", None))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if loader is None:
            from diffusers import DiffusionPipeline

            cls = pipeline_class or DiffusionPipeline

            def loader(path: Path, torch_dtype: torch.dtype) -> Any:
                with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; older ones need it
                    warnings.simplefilter("ignore", FutureWarning)
                    variant = {"variant": "fp16"} if weights_variant(path) else {}  # fp16 files, cast to torch_dtype
                    return cls.from_pretrained(
                        str(path), torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True, **variant
                    )

        try:
            pipeline = loader(folder, dtype)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"the model folder {folder} could not be loaded: {str(error).splitlines()[0]}. "
                f"It must be a complete diffusers-layout folder with .safetensors weights; {DOCS_HINT}."
            ) from None
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        if cpu_offload and device.type == "cuda":
            pipeline.enable_model_cpu_offload(device=device)
        else:
            pipeline.to(device)
        loaded = LoadedModel(pipeline, folder, device, dtype, bool(cpu_offload and device.type == "cuda"))
        _CACHE[key] = loaded
        return loaded


def loaded_models() -> list[str]:
    """Folders of the pipelines held warm in this process (for the health endpoint)."""
    with _LOCK:
        return sorted({str(loaded.folder) for loaded in _CACHE.values()})


def release_models() -> None:
    """Drop every warm pipeline (and the GPU memory they hold)."""
    with _LOCK:
        _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EvaluationCounter:
    """Counts network evaluations of a denoiser: one per sample in each forward batch.

    With classifier-free guidance the conditional and unconditional halves of a batch are two
    evaluations each, as in the paper's count (~80 per asset).
    """

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else next(iter(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        self.count += int(sample.shape[0])
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def denoiser_of(pipeline: Any) -> torch.nn.Module:
    """The network a diffusers pipeline evaluates per step (a UNet or a transformer)."""
    for name in ("unet", "transformer", "prior", "decoder"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipeline).__name__} has neither a unet nor a transformer to count evaluations of")
