"""What models a configuration needs, where each one lives on disk, and whether it is usable.

Everything here reads the filesystem only (no network, no torch import), so the service can
answer `GET /v1/models` and check a job at submit time in milliseconds.

A configuration needs up to three models:

- `text-to-image` (`diffusion.text_to_image_model`, a diffusers-layout repository): only for a
  generate job without an input image;
- `orbit-video` (`diffusion.orbit_model`): for generate and for refine with diffusion on. Stability's
  SV3D is published as single `sgm` checkpoints (`stabilityai/sv3d`: `sv3d_p.safetensors`,
  `sv3d_u.safetensors`); we download the one file and convert it into our diffusers layout under
  `models_root()`. `stabilityai/sv3d` means SV3D_p; `stabilityai/sv3d:sv3d_u` the unconditioned one;
- `lpips-vgg` / `lpips-alex` (`recon.lpips_net`): torchvision's ImageNet backbone in the torch hub
  cache, only when `recon.lpips_weight > 0`. The `lpips` package's linear heads ship in its wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

# ----------------------------------------------------------------------------------------------
# Known models: licences, gating and the files the project loads, for use without the network.

HUB_URL = "https://huggingface.co"

# sgm single-file checkpoints that `pull` converts: model id -> repository, file, variant.
SGM_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "stabilityai/sv3d": ("stabilityai/sv3d", "sv3d_p.safetensors", "sv3d_p"),
    "stabilityai/sv3d:sv3d_p": ("stabilityai/sv3d", "sv3d_p.safetensors", "sv3d_p"),
    "stabilityai/sv3d:sv3d_u": ("stabilityai/sv3d", "sv3d_u.safetensors", "sv3d_u"),
}


@dataclass(frozen=True)
class KnownModel:
    licence: str  # the licence's name as the model card gives it
    gated: bool  # the Hub asks the user to accept the licence before downloading
    download_bytes: int  # bytes `pull` fetches (the files the project loads), as published


KNOWN_MODELS: dict[str, KnownModel] = {
    # fp16 diffusers sub-folders only: unet 5.14 GB, text encoders 1.39 GB + 0.25 GB, vae 0.17 GB, configs
    "stabilityai/sdxl-turbo": KnownModel("Stability AI Community License (sai-nc-community)", False, 6_940_000_000),
    "stabilityai/sv3d": KnownModel("Stability AI Community License", True, 9_370_000_000),
}

# torchvision's ImageNet backbones for LPIPS: the file name carries the sha256 prefix, as
# torchvision checks it (torch.hub.HASH_REGEX), and the size is what download.pytorch.org serves.
LPIPS_BACKBONES: dict[str, tuple[str, int]] = {
    "vgg": ("vgg16-397923af.pth", 553_433_881),
    "alex": ("alexnet-owt-7be5be79.pth", 244_408_911),
}
TORCHVISION_URL = "https://download.pytorch.org/models"  # $IM3D_TORCHVISION_URL: a mirror of it
LPIPS_LICENCE = "BSD-3-Clause (torchvision weights); LPIPS heads BSD-2-Clause, inside the lpips package"
HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub.HASH_REGEX, without importing torch


# ----------------------------------------------------------------------------------------------
# Where things live (read from the environment at call time: tests and the service set it late)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def backbone_url(net: str) -> str:
    """torchvision's published URL of the backbone ($IM3D_TORCHVISION_URL names a mirror of that folder)."""
    base = (os.environ.get("IM3D_TORCHVISION_URL") or TORCHVISION_URL).rstrip("/")
    return f"{base}/{LPIPS_BACKBONES[net][0]}"


def hf_endpoint() -> str:
    """The Hub to download from ($HF_ENDPOINT, as huggingface_hub reads it, but at call time)."""
    return (os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub or $XDG_CACHE_HOME/torch/hub."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "hub"):
        return Path(torch.hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def models_root(models_dir: str = "") -> Path:
    """Where converted models go: diffusion.models_dir, else $IM3D_MODELS_DIR, else ~/.cache/im3d/models."""
    if models_dir:
        return Path(models_dir).expanduser()
    if os.environ.get("IM3D_MODELS_DIR"):
        return Path(os.environ["IM3D_MODELS_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "im3d" / "models"


def sgm_source(model_id: str) -> tuple[str, str, str] | None:
    """(repository, checkpoint file, variant) for an sgm checkpoint id such as `stabilityai/sv3d`."""
    return SGM_CHECKPOINTS.get(model_id.strip())


def converted_folder(model_id: str, models_dir: str = "") -> Path:
    """Where the diffusers-layout conversion of an sgm checkpoint id lives."""
    repo, _, variant = SGM_CHECKPOINTS[model_id.strip()]
    return models_root(models_dir) / f"{repo.replace('/', '--')}--{variant}"


def hf_snapshot(repo_id: str, filename: str = "model_index.json", revision: str = "main") -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` holding `filename`, or None.

    The Hugging Face cache layout (`models--org--name/refs/<revision>` holds the commit,
    `snapshots/<commit>/<file>` links to the blob), read directly: huggingface_hub's
    `try_to_load_from_cache` does the same but importing it costs half a second, and preflight
    has to answer in milliseconds.
    """
    folder = hf_repo_cache_folder(repo_id)
    try:
        commit = (folder / "refs" / revision).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    snapshot = folder / "snapshots" / commit
    if not commit or "/" in commit or not (snapshot / filename).is_file():  # is_file: a dangling link is missing
        return None
    return snapshot


def hf_repo_cache_folder(repo_id: str) -> Path:
    return hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def backbone_path(net: str) -> Path:
    """Where torchvision (and `im3d.splats.losses.load_lpips`) expects the LPIPS backbone."""
    return torch_hub_dir() / "checkpoints" / LPIPS_BACKBONES[net][0]


def lpips_heads_present(net: str) -> bool:
    """The lpips package ships its linear heads (`lpips/weights/v0.1/<net>.pth`) inside the wheel."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "weights" / "v0.1" / f"{net}.pth").is_file() for p in spec.submodule_search_locations)


# ----------------------------------------------------------------------------------------------
# Checking a diffusers-layout folder without loading it


def diffusers_folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from loading as a diffusers pipeline (empty: nothing structural).

    Every component named in model_index.json must be a sub-folder; a model component (one with
    config.json) must hold .safetensors weights, and a sharded one every shard its index lists.
    Reads file names and two small JSON files per component; never weights.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        return [f"{folder}: no model_index.json"]
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [f"{index}: unreadable ({error})"]
    problems = []
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"{name}/: missing")
            continue
        files = [p for p in sub.iterdir() if p.is_file()]  # is_file: a dangling cache link is missing
        if not files:
            problems.append(f"{name}/: empty")
            continue
        if not (sub / "config.json").is_file():
            continue  # tokenizer, scheduler, feature extractor: configuration files only
        weights = [p for p in files if p.name.endswith(".safetensors")]
        if not weights:
            problems.append(f"{name}/: no .safetensors weights")
        for shard_index in sub.glob("*.safetensors.index*.json"):
            try:
                shards = set(json.loads(shard_index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                problems.append(f"{name}/{shard_index.name}: unreadable")
                continue
            missing = sorted(s for s in shards if not (sub / s).is_file())
            if missing:
                problems.append(f"{name}/: {len(missing)} weight shard(s) missing ({', '.join(missing[:2])})")
    return problems


def folder_size(folder: Path) -> int:
    """Bytes under `folder`; for a Hugging Face cache repository folder, its blobs (links counted once)."""
    if (folder / "blobs").is_dir() and (folder / "snapshots").is_dir():
        folder = folder / "blobs"
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size  # follows the HF cache's links to the blobs
        except OSError:
            continue
    return total


# ----------------------------------------------------------------------------------------------
# The registry


@dataclass
class ModelStatus:
    name: str  # what `im3d models pull NAME` takes: text-to-image, orbit-video, lpips-vgg, lpips-alex
    role: str  # what the method uses it for
    model_id: str  # the configured id, folder or file
    source: str  # huggingface (diffusers repo), huggingface-sgm (checkpoint + convert), url, local
    path: str  # where it is, or where pull would put it
    status: str  # present | missing | incomplete
    problems: list[str] = field(default_factory=list)  # why it is not present
    size_on_disk: int = 0  # bytes it occupies now
    download_bytes: int | None = None  # bytes pull would fetch; None: unknown without asking the Hub
    licence: str = ""  # the licence's name ("" when unknown offline)
    licence_url: str = ""  # where to read (and for gated models, accept) the licence
    gated: bool = False  # the Hub requires accepting the licence (and a token) to download
    pullable: bool = True  # `pull` can fetch it (false for a local folder that is not there)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def present(self) -> bool:
        return self.status == "present"


def _diffusion(config: Any) -> Any:
    return config.diffusion


def needed_models(config: Any, request: Mapping[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(name, role, model id) of every model a job needs; without a request, what any job could need.

    A generate job with an input image skips text-to-image; reconstruct never diffuses; the fit
    needs the LPIPS backbone only when recon.lpips_weight > 0.
    """
    kind = (request or {}).get("kind")
    has_image = bool((request or {}).get("image"))
    d = _diffusion(config)
    needed = []
    if d.enabled and kind in (None, "generate") and not (kind == "generate" and has_image):
        needed.append(("text-to-image", "prompt -> reference image", d.text_to_image_model))
    if d.enabled and kind in (None, "generate", "refine"):
        needed.append(("orbit-video", "reference image -> orbit video, re-diffusion", d.orbit_model))
    if config.recon.lpips_weight > 0:
        net = config.recon.lpips_net
        needed.append((f"lpips-{net}", f"LPIPS-{net} loss of the splat fit", net))
    return needed


def model_status(name: str, role: str, model_id: str, models_dir: str = "") -> ModelStatus:
    """Where one model is and whether it is usable, from the filesystem alone."""
    if name.startswith("lpips-"):
        return _lpips_status(name, role, model_id)
    sgm = sgm_source(model_id)
    if sgm is not None:
        return _sgm_status(name, role, model_id, sgm, models_dir)
    return _diffusers_status(name, role, model_id, models_dir)


def _lpips_status(name: str, role: str, net: str) -> ModelStatus:
    file_name, size = LPIPS_BACKBONES[net]
    path = backbone_path(net)
    st = ModelStatus(name, role, file_name, "url", str(path), "missing", download_bytes=size, licence=LPIPS_LICENCE,
                     licence_url="https://github.com/pytorch/vision/blob/main/LICENSE")
    if not lpips_heads_present(net):
        st.status = "incomplete"
        st.problems.append(f"the lpips package's {net}.pth heads are missing: reinstall the backend environment")
    if path.is_file():
        st.size_on_disk = path.stat().st_size
        st.download_bytes = 0
        if st.size_on_disk != size:
            st.status = "incomplete"
            st.problems.append(f"{path} is {st.size_on_disk} bytes, torchvision's file is {size}")
        elif not st.problems:
            st.status = "present"
    else:
        st.problems.append(f"{path}: not downloaded")
    return st


def _known(model_id: str) -> KnownModel | None:
    return KNOWN_MODELS.get(model_id.split(":")[0])


def _sgm_status(name: str, role: str, model_id: str, sgm: tuple[str, str, str], models_dir: str) -> ModelStatus:
    repo, file_name, variant = sgm
    out = converted_folder(model_id, models_dir)
    known = _known(repo)
    st = ModelStatus(name, role, model_id, "huggingface-sgm", str(out), "missing", licence=known.licence if known else "",
                     licence_url=f"{HUB_URL}/{repo}", gated=bool(known and known.gated),
                     download_bytes=known.download_bytes if known else None)
    if out.is_dir():
        problems = diffusers_folder_problems(out)
        st.size_on_disk = folder_size(out)
        if not problems:
            st.status, st.download_bytes = "present", 0
            return st
        st.status = "incomplete"
        st.problems += [f"converted folder: {p}" for p in problems]
    checkpoint = hf_snapshot(repo, file_name)
    if checkpoint is not None:
        st.status = "incomplete"
        st.download_bytes = 0
        st.problems.append(f"{repo}/{file_name} is downloaded but not converted yet (pull converts it without downloading again)")
    elif not st.problems:
        st.problems.append(f"{repo}/{file_name}: not downloaded")
    return st


def _diffusers_status(name: str, role: str, model_id: str, models_dir: str) -> ModelStatus:
    known = _known(model_id)
    st = ModelStatus(name, role, model_id, "huggingface", "", "missing", licence=known.licence if known else "",
                     gated=bool(known and known.gated), download_bytes=known.download_bytes if known else None)
    candidates = candidate_folders(model_id, models_dir)
    is_repo_id = _is_repo_id(model_id)
    if is_repo_id:
        st.licence_url = f"{HUB_URL}/{model_id}"
    else:
        st.source, st.pullable, st.download_bytes = "local", False, None
    for folder in candidates:
        if folder.is_dir():
            problems = diffusers_folder_problems(folder)
            st.path, st.size_on_disk = str(folder), folder_size(folder)
            if not problems:
                st.status, st.download_bytes = "present", 0
                return st
            st.status = "incomplete"
            st.problems += problems
            return st
    snapshot = hf_repo_cache_folder(model_id) if is_repo_id else None
    if snapshot is not None and snapshot.is_dir():
        # a pull that stopped part-way: blobs and files but never model_index.json (it comes last)
        st.status, st.path = "incomplete", str(snapshot)
        st.size_on_disk = folder_size(snapshot)
        st.problems.append(f"{snapshot}: download not finished (no model_index.json yet)")
        return st
    st.path = str(pull_target(model_id, models_dir)) if is_repo_id else str(Path(model_id).expanduser())
    st.problems.append("not downloaded" if is_repo_id else f"{model_id}: no such folder")
    return st


def _is_repo_id(model_id: str) -> bool:
    path = Path(model_id).expanduser()
    return (
        model_id.count("/") == 1
        and not path.is_absolute()
        and not model_id.startswith((".", "~"))
        and not path.exists()
        and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model_id))
    )


def pull_target(model_id: str, models_dir: str = "") -> Path:
    """Where pull puts a diffusers repository: `<models_dir>/<org>--<name>` when set, else the HF cache."""
    if models_dir:
        return Path(models_dir).expanduser() / model_id.replace("/", "--")
    return hf_repo_cache_folder(model_id)


def candidate_folders(model_id: str, models_dir: str = "") -> list[Path]:
    """The folders a model id may resolve to, in lookup order (the loader's order)."""
    found: list[Path] = []
    direct = Path(model_id).expanduser()
    if direct.is_absolute() or direct.exists() or model_id.startswith((".", "~")):
        found.append(direct)
    if models_dir:
        root = Path(models_dir).expanduser()
        name = model_id.split("/")[-1]
        found += [root / model_id, root / model_id.replace("/", "--"), root / name]
    if _is_repo_id(model_id):
        snapshot = hf_snapshot(model_id)
        if snapshot is not None:
            found.append(snapshot)
    return list(dict.fromkeys(found))


def model_statuses(config: Any, request: Mapping[str, Any] | None = None) -> list[ModelStatus]:
    """The status of every model the (job's) configuration needs."""
    models_dir = _diffusion(config).models_dir
    return [model_status(name, role, model_id, models_dir) for name, role, model_id in needed_models(config, request)]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
