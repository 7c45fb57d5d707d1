"""Downloading the models a configuration needs: `im3d models pull` and `POST /v1/models/pull`.

- Hugging Face repositories go through `huggingface_hub` (`HfApi.model_info` for the file list,
  sizes, gating and licence; `hf_hub_download` per file), so its cache layout, resume of a
  half-downloaded blob (`.incomplete` + an HTTP Range request), tokens (`token=` / $HF_TOKEN /
  `hf auth login`) and gated-repository errors are the Hub client's own. Only the files the
  project loads are fetched (`select_diffusers_files`), and `model_index.json` is fetched last:
  a folder without it is never taken for a model, so an interrupted pull leaves nothing that
  `list` or the loader would call present.
- Stability's SV3D is one `sgm` checkpoint file; it is downloaded the same way and converted
  into the diffusers layout right after (the conversion writes its folder atomically).
- The LPIPS backbone comes from torchvision's URL into the torch hub cache, checked against the
  sha256 prefix in its file name as torchvision checks it, written to `<file>.partial` and
  renamed only when the hash matches.

Progress is reported in bytes over everything to fetch; `cancel()` is checked for every chunk.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from im3d.errors import Cancelled, Im3dError, check_cancel
from im3d.weights.registry import (
    HASH_PREFIX,
    HUB_URL,
    LPIPS_BACKBONES,
    ModelStatus,
    backbone_url,
    converted_folder,
    format_bytes,
    hf_cache_dir,
    hf_endpoint,
    model_statuses,
    sgm_source,
)

ProgressFn = Callable[[float, str], None]

# Weight formats the project never loads (safetensors only; pickles are never even fetched).
OTHER_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".gguf", ".tflite", ".ot")
SKIPPED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".gitattributes")


class PullError(Im3dError):
    """A download could not be done; the message says what to do."""


def select_diffusers_files(files: list[str]) -> list[str]:
    """The files of a diffusers-layout repository that `from_pretrained(use_safetensors=True)` loads.

    `model_index.json`, each component folder's configuration files, and its `.safetensors`
    weights: the fp16 variant where the repository has one (half the download; the loader picks
    the variant up and casts to the run's dtype), else the full-precision files. Top-level files
    (single-file checkpoints such as sdxl-turbo's 21 GB of them), pickled weights, and sub-sub-folders
    are skipped. `model_index.json` comes last (see the module docstring).
    """
    if "model_index.json" not in files:
        raise PullError("not_diffusers_layout", "the repository has no model_index.json: it is not in the diffusers layout")
    by_component: dict[str, list[str]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) == 2:
            by_component.setdefault(parts[0], []).append(name)
    chosen: list[str] = []
    for component, names in sorted(by_component.items()):
        weights = [n for n in names if n.endswith(".safetensors")]
        fp16 = [n for n in weights if ".fp16." in n or ".fp16-" in n]
        keep_weights = fp16 or [n for n in weights if n not in fp16]
        for name in sorted(names):
            base = name.split("/")[-1]
            if name.endswith(".safetensors"):
                if name in keep_weights:
                    chosen.append(name)
            elif ".safetensors.index" in base and base.endswith(".json"):
                if (".fp16." in base) == bool(fp16):
                    chosen.append(name)
            elif base.endswith(OTHER_WEIGHT_SUFFIXES) or ".bin.index" in base or base.endswith(SKIPPED_SUFFIXES):
                continue
            else:
                chosen.append(name)
    return chosen + ["model_index.json"]


@dataclass
class FileToFetch:
    model: str  # registry name (text-to-image, ...)
    repo_id: str  # Hugging Face repository, or "" for a URL
    path: str  # file in the repository, or the URL
    size: int  # bytes
    dest: Path | None = None  # for URL downloads: the final file


@dataclass
class PullPlan:
    statuses: list[ModelStatus]  # what was asked for, before the pull
    files: list[FileToFetch] = field(default_factory=list)
    convert: list[str] = field(default_factory=list)  # sgm model ids to convert after their download

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class _Bytes:
    """Bytes done over the whole pull, turned into progress(fraction, message) calls."""

    def __init__(self, total: int, progress: ProgressFn | None, cancel: Callable[[], bool] | None):
        self.total, self.done, self.progress, self.cancel = max(total, 1), 0, progress, cancel
        self.label = ""
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        check_cancel(self.cancel)
        now = time.monotonic()
        if self.progress is not None and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self.progress(min(self.done / self.total, 1.0), f"{self.label} {format_bytes(self.done)} / {format_bytes(self.total)}")

    def tqdm_class(self) -> type:
        """A stand-in for tqdm that huggingface_hub's downloader updates with byte counts."""
        counter = self

        class _Bar:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                counter.add(int(kwargs.get("initial") or 0))  # a resumed blob's bytes already there

            def __enter__(self) -> "_Bar":
                return self

            def __exit__(self, *exc: Any) -> None:
                pass

            def update(self, n: int | float | None = 1) -> None:
                counter.add(int(n or 0))

            def update_transfer(self, n: int | float | None = 1) -> None:
                pass

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            set_transfer_postfix_str = set_description = set_description_str = set_postfix_str

            def refresh(self, *args: Any, **kwargs: Any) -> None:
                pass

            def close(self) -> None:
                pass

        return _Bar


def _hub_error(error: BaseException, repo_id: str, what: str) -> PullError:
    """huggingface_hub's HTTP errors, told in words that say what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"{HUB_URL}/{repo_id}"
    if isinstance(error, GatedRepoError):
        return PullError(
            "model_gated",
            f"{repo_id} is a gated model: open {page} while logged in, accept its licence, then give the same "
            f"account's access token (`hf auth login`, HF_TOKEN, `im3d models pull --token`, or the token field in "
            f"Blender's Preferences > Models) and pull {what} again",
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401 or isinstance(error, RepositoryNotFoundError):
        return PullError(
            "model_unauthorized" if status == 401 else "model_repo_not_found",
            f"the Hub refused {repo_id} (HTTP {status}): check the model id, and for a private or gated model "
            f"accept its licence at {page} and give an access token (`hf auth login` or HF_TOKEN)",
        )
    if isinstance(error, HfHubHTTPError):
        return PullError("download_failed", f"downloading {what} from {repo_id} failed (HTTP {status}); try again later")
    return PullError("download_failed", f"downloading {what} from {repo_id} failed: {type(error).__name__}: {str(error)[:200]}; check the network and run the pull again (it resumes)")


def plan_pull(statuses: list[ModelStatus], token: str | None = None, models_dir: str = "") -> PullPlan:
    """Ask the Hub which files each missing model needs and how big they are (one call per repository)."""
    from huggingface_hub import HfApi

    plan = PullPlan(statuses)
    api = HfApi(endpoint=hf_endpoint())
    for st in statuses:
        if st.present:
            continue
        if not st.pullable:
            raise PullError("model_not_found", f"{st.name}: {st.model_id} is a local folder that does not exist; fix the path in the config")
        if st.source == "url":
            net = st.name.removeprefix("lpips-")
            size = LPIPS_BACKBONES[net][1]
            url = backbone_url(net)
            partial = Path(st.path + ".partial")
            already = partial.stat().st_size if partial.is_file() else 0
            plan.files.append(FileToFetch(st.name, "", url, max(size - already, 0), Path(st.path)))
            continue
        sgm = sgm_source(st.model_id)
        repo_id = sgm[0] if sgm else st.model_id
        try:
            info = api.model_info(repo_id, files_metadata=True, token=token)
        except Exception as error:  # noqa: BLE001 - every Hub failure is told as a PullError
            raise _hub_error(error, repo_id, st.name) from None
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        st.gated = bool(info.gated) or st.gated
        licence = (info.card_data or {}).get("license") if info.card_data is not None else None
        if licence:
            st.licence = str(licence)
        if sgm:
            if sgm[1] not in sizes:
                raise PullError("download_failed", f"{repo_id} has no file {sgm[1]}; the repository changed, update im3d")
            if "downloaded but not converted" not in " ".join(st.problems):
                plan.files.append(FileToFetch(st.name, repo_id, sgm[1], sizes[sgm[1]]))
            plan.convert.append(st.model_id)
        else:
            try:
                chosen = select_diffusers_files(sorted(sizes))
            except PullError as error:
                raise PullError(error.code, f"{st.name}: {repo_id}: {error.message}; configure a diffusers-layout model") from None
            plan.files += [FileToFetch(st.name, repo_id, name, sizes[name]) for name in chosen]
        st.download_bytes = sum(f.size for f in plan.files if f.model == st.name)
    return plan


def pull(
    statuses: list[ModelStatus],
    *,
    token: str | None = None,
    models_dir: str = "",
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    convert_options: dict[str, Any] | None = None,
) -> PullPlan:
    """Download (and convert) every model in `statuses` that is not present; returns the plan it ran.

    `convert_options` go to `convert_sv3d_checkpoint` (head sizes of a scaled-down test checkpoint)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PullError("offline", "HF_HUB_OFFLINE is set, so nothing is downloaded (the Hub's and torchvision's files alike); unset it and pull again")
    plan = plan_pull(statuses, token=token, models_dir=models_dir)
    # a conversion streams the whole checkpoint once more: it gets the last part of the bar
    share = 0.8 if plan.convert else 1.0
    downloads = (lambda f, m: progress(share * f, m)) if progress is not None else None
    counter = _Bytes(plan.total_bytes, downloads, cancel)
    if progress is not None:
        progress(0.0, f"fetching {len(plan.files)} files, {format_bytes(plan.total_bytes)}")
    for item in plan.files:
        check_cancel(cancel)
        counter.label = f"{item.model}: {item.path.split('/')[-1]}"
        if item.repo_id:
            before = counter.done
            _fetch_hub_file(item, counter, token, models_dir)
            counter.add(max(item.size - (counter.done - before), 0))  # a file already there counts as fetched
        else:
            download_url(item.path, item.dest, counter=counter, cancel=cancel)
    for k, model_id in enumerate(plan.convert):
        start, width = share + (1 - share) * k / len(plan.convert), (1 - share) / len(plan.convert)
        step = (lambda f, m, a=start, w=width: progress(min(a + w * f, 1.0), m)) if progress is not None else None
        _convert(model_id, models_dir, step, cancel, convert_options or {})
    return plan


def _fetch_hub_file(item: FileToFetch, counter: _Bytes, token: str | None, models_dir: str) -> Path:
    from huggingface_hub import hf_hub_download

    where: dict[str, Any] = {"cache_dir": str(hf_cache_dir())}
    if models_dir and not sgm_source(item.repo_id):
        where = {"local_dir": str(Path(models_dir).expanduser() / item.repo_id.replace("/", "--"))}
    try:
        return Path(hf_hub_download(item.repo_id, item.path, endpoint=hf_endpoint(), token=token, tqdm_class=counter.tqdm_class(), **where))
    except Exception as error:  # noqa: BLE001
        if isinstance(error, Cancelled) or (counter.cancel is not None and counter.cancel()):
            # Xet transfers report progress from hf_xet's threads, where our Cancelled may surface as
            # another error: a cancel asked for is a cancel. Stop hf_xet's own transfers too.
            _abort_xet()
            raise Cancelled() from None
        raise _hub_error(error, item.repo_id, item.model) from None


def _abort_xet() -> None:
    # huggingface_hub has no public way to stop hf_xet's background transfers; its private
    # `abort_xet_session` is used best-effort: on another layout this does nothing, and the cancel
    # still stops our download loop (tests/test_weights_pull.py checks the name still resolves
    # in the locked environment).
    try:
        from huggingface_hub.utils._xet import abort_xet_session
    except ImportError:  # another huggingface_hub layout, or no Xet: nothing runs in the background
        return
    try:
        abort_xet_session()
    except Exception:  # noqa: BLE001 - best effort: the session may already be gone
        pass


def _convert(model_id: str, models_dir: str, progress: ProgressFn | None, cancel: Callable[[], bool] | None,
             options: dict[str, Any]) -> Path:
    repo_id, file_name, _ = sgm_source(model_id)
    from huggingface_hub import try_to_load_from_cache

    source = try_to_load_from_cache(repo_id, file_name, cache_dir=str(hf_cache_dir()))
    if not isinstance(source, str):
        raise PullError("download_failed", f"{repo_id}/{file_name} is not in the cache after its download; pull again")
    try:
        from im3d.diffusion.convert_sv3d import convert_sv3d_checkpoint
    except ImportError as error:
        raise PullError("convert_unavailable", f"the SV3D converter could not be loaded ({error}); reinstall the backend") from None
    out = converted_folder(model_id, models_dir)
    out.parent.mkdir(parents=True, exist_ok=True)

    def sub(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, f"converting {file_name}: {message}")

    return convert_sv3d_checkpoint(source, out, progress=sub, cancel=cancel, overwrite=True, **options)


# ----------------------------------------------------------------------------------------------
# Plain URL downloads with torchvision's hash check


def expected_hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix torchvision puts in its weight file names (`vgg16-397923af.pth`)."""
    match = HASH_PREFIX.search(file_name)
    return match.group(1) if match and match.group(1) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_url(
    url: str,
    dest: Path,
    *,
    counter: _Bytes | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    chunk: int = 1 << 20,
    timeout: float = 60.0,
) -> Path:
    """Fetch `url` into `dest`, atomically and resumably, refusing it unless the hash matches.

    Bytes go to `<dest>.partial` (resumed with a Range request when one is there); the sha256 of
    the whole file must start with the prefix in `dest`'s name, else the partial file is deleted
    and nothing is placed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    prefix = expected_hash_prefix(dest.name)
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    if counter is None:
        counter = _Bytes(0, progress, cancel)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the URL is ours
            if have and response.status != 206:
                have = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            if counter.total <= 1 and length:
                counter.total = int(length) + have
            received = 0
            with open(partial, "ab" if have else "wb") as out:
                while True:
                    data = response.read1(chunk)  # what has arrived; b"" at the end, also when cut short
                    if not data:
                        break
                    out.write(data)
                    received += len(data)
                    counter.add(len(data))
                out.flush()
                os.fsync(out.fileno())
            if length is not None and received < int(length):
                raise PullError("download_failed", f"the connection to {url} dropped after {format_bytes(have + received)}; pull again, it resumes from there")
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the partial file is already whole
            pass
        else:
            raise PullError("download_failed", f"downloading {url} failed: HTTP {error.code}; check the network and pull again") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise PullError("download_failed", f"downloading {url} failed ({error}); run the pull again (it resumes)") from None
    if prefix:
        digest = sha256_of(partial)
        if not digest.startswith(prefix):
            partial.unlink(missing_ok=True)
            raise PullError(
                "hash_mismatch",
                f"{url} does not match the sha256 prefix {prefix} in its name (got {digest[:len(prefix)]}); "
                f"the download was discarded: pull again, and if it keeps failing the mirror serves a wrong file",
            )
    os.replace(partial, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# The entry point the CLI and the service use


def select_statuses(config: Any, names: list[str] | None = None) -> list[ModelStatus]:
    """The needed models' statuses, narrowed to `names` (registry names or model ids) when given."""
    statuses = model_statuses(config)
    if not names:
        return statuses
    chosen = [st for st in statuses if st.name in names or st.model_id in names]
    unknown = [n for n in names if not any(n in (st.name, st.model_id) for st in statuses)]
    if unknown:
        known = ", ".join(st.name for st in statuses) or "none (this config needs no models)"
        raise PullError("invalid_request", f"unknown model(s) {', '.join(unknown)}; this config needs: {known}")
    return chosen


def pull_models(
    config: Any,
    names: list[str] | None = None,
    *,
    token: str | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    convert_options: dict[str, Any] | None = None,
) -> list[ModelStatus]:
    """Download and convert what the config needs (or the named models); returns their statuses after."""
    statuses = select_statuses(config, names)
    pull(statuses, token=token, models_dir=config.diffusion.models_dir, progress=progress, cancel=cancel,
         convert_options=convert_options)
    after = select_statuses(config, [st.name for st in statuses])
    for st, before in zip(after, statuses):  # what the Hub said about licence and gating
        st.licence, st.gated = before.licence or st.licence, before.gated or st.gated
    still = [st for st in after if not st.present]
    if still:
        details = "; ".join(f"{st.name}: {', '.join(st.problems) or st.status}" for st in still)
        raise PullError("download_failed", f"after the pull, not usable: {details}")
    if progress is not None:
        progress(1.0, "all models present")
    return after
