"""`im3d models pull` against a local server speaking the Hub's file API (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hub_server import ALLOWED_TINY_FILES, HubServer, HubState, Repo, tiny_diffusers_repo

from im3d.config import load_config
from im3d.errors import Cancelled
from im3d.weights import model_statuses, preflight
from im3d.weights.pull import PullError, download_url, pull_models, select_diffusers_files


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Empty caches under tmp_path; downloads allowed (conftest makes the Hub offline for other tests)."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_TOKEN", "HF_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # also: no stored `hf auth login` token
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("IM3D_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # no stored login
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True, raising=False)
    # huggingface_hub writes what it receives in 10 MB chunks, so a cut loses the chunk in flight;
    # the test repository is small, so the chunks are scaled down with it.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    return tmp_path


CHUNK = 16 * 1024


def _resumed_from(get: dict) -> int:
    assert get["range"] and get["range"].startswith("bytes=") and get["range"].endswith("-"), get
    return int(get["range"][6:-1])


def _config(t2i="test/tiny", orbit="test/gated-orbit", lpips=0.0):
    return load_config("standard", overrides={
        "diffusion": {"text_to_image_model": t2i, "orbit_model": orbit},
        "recon": {"lpips_weight": lpips, "lpips_net": "alex"},
    })


def _snapshot_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_select_diffusers_files_takes_only_what_the_loader_reads():
    files = sorted(tiny_diffusers_repo(1024))
    chosen = select_diffusers_files(files)
    assert set(chosen) == ALLOWED_TINY_FILES
    assert chosen[-1] == "model_index.json"  # last: its presence means the rest is there
    # without an fp16 variant the full-precision safetensors are taken; sharded ones with their index
    plain = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model.bin.index.json", "vae/diffusion_pytorch_model.bin", "vae/config.json"]
    assert set(select_diffusers_files(plain)) == set(plain) - {"unet/diffusion_pytorch_model.bin.index.json", "vae/diffusion_pytorch_model.bin"}
    with pytest.raises(PullError) as error:
        select_diffusers_files(["sv3d_p.safetensors"])
    assert error.value.code == "not_diffusers_layout"


# stabilityai/sdxl-turbo's published file list (21 GB of single-file checkpoints at the top level)
SDXL_TURBO_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "image_quality_one_step.png", "output_tile.jpg", "model_index.json",
    "prompt_alignment_one_step.png", "sd_xl_turbo_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors", "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]


def test_sdxl_turbo_pull_takes_the_fp16_diffusers_subfolders_only():
    chosen = select_diffusers_files(SDXL_TURBO_FILES)
    weights = sorted(n for n in chosen if n.endswith(".safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert "scheduler/scheduler_config.json" in chosen and "tokenizer_2/vocab.json" in chosen
    assert not any(n.startswith("sd_xl_turbo") or "/" not in n and n != "model_index.json" for n in chosen)


def test_pull_fetches_only_allowed_files_with_progress_and_resumes_after_a_cut(hub_env):
    repo = tiny_diffusers_repo()
    state = HubState(repos={"test/tiny": Repo(repo)})
    state.cut_once.add("test/tiny/unet/diffusion_pytorch_model.fp16.safetensors")
    config = _config()
    config.diffusion.enabled = True
    events = []
    with HubServer(state) as hub:
        import os

        os.environ["HF_ENDPOINT"] = hub.url
        try:
            statuses = pull_models(config, ["text-to-image"], progress=lambda f, m: events.append((f, m)))
        finally:
            del os.environ["HF_ENDPOINT"]
        fetched = {r["path"].split("/resolve/main/")[1] for r in state.requests if r["method"] == "GET" and "/resolve/" in r["path"]}
        weight_gets = hub.gets("unet/diffusion_pytorch_model.fp16.safetensors")
    assert fetched == ALLOWED_TINY_FILES  # no single-file checkpoint, no pickle, no fp32 copy
    # the connection was cut halfway through the weights; the client resumed with a Range request
    assert len(weight_gets) == 2 and weight_gets[0]["range"] is None
    half = len(repo["unet/diffusion_pytorch_model.fp16.safetensors"]) // 2
    assert half - CHUNK < _resumed_from(weight_gets[1]) <= half
    # progress: monotonic fractions ending at 1, in bytes of exactly the allowed files
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    total = sum(len(repo[name]) for name in ALLOWED_TINY_FILES)
    assert any(f"/ {total / 1000:.2f} KB" in m for _, m in events), events[-3:]
    (st,) = statuses
    assert st.status == "present" and st.licence == "test-licence"
    folder = Path(st.path)
    assert _snapshot_files(folder) == ALLOWED_TINY_FILES
    weights = (folder / "unet/diffusion_pytorch_model.fp16.safetensors").read_bytes()
    assert hashlib.sha256(weights).digest() == hashlib.sha256(repo["unet/diffusion_pytorch_model.fp16.safetensors"]).digest()
    # `im3d models verify` reads every header; a truncated weights file is named
    from im3d.cli import main

    args = ["models", "verify", "text-to-image", "--set", "diffusion.text_to_image_model=test/tiny", "--set", "recon.lpips_weight=0"]
    assert main(args) == 0
    weights_file = (folder / "unet/diffusion_pytorch_model.fp16.safetensors").resolve()
    weights_file.write_bytes(weights[:100])
    assert main(args) == 1


def test_cancelled_pull_leaves_nothing_present_and_the_next_pull_resumes(hub_env):
    repo = tiny_diffusers_repo(400_000)
    state = HubState(repos={"test/tiny": Repo(repo)})
    config = _config()
    big = "unet/diffusion_pytorch_model.fp16.safetensors"
    with HubServer(state) as hub:
        import os

        os.environ["HF_ENDPOINT"] = hub.url
        try:
            # cancel once part of the weights is on disk: the pull stops inside the big file
            blobs = hub_env / "hf" / "hub" / "models--test--tiny" / "blobs"

            def cancel() -> bool:
                return any(p.stat().st_size >= 4 * CHUNK for p in blobs.glob("*.incomplete"))

            with pytest.raises(Cancelled):
                pull_models(config, ["text-to-image"], cancel=cancel)
            assert not list(blobs.glob("*.incomplete"))  # nothing half-downloaded is left behind
            (st,) = model_statuses(config, {"kind": "generate", "prompt": "x"})[:1]
            assert st.name == "text-to-image" and st.status == "incomplete", st
            with pytest.raises(Exception) as error:
                preflight(config, {"kind": "generate", "prompt": "x"})
            assert error.value.code == "model_not_found" and "text-to-image" in error.value.message
            assert not hub.gets("model_index.json")  # fetched last, so never after a failure
            statuses = pull_models(config, ["text-to-image"])
        finally:
            del os.environ["HF_ENDPOINT"]
        gets = hub.gets(big)
        small_gets = [hub.gets(name) for name in ("scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json")]
    assert statuses[0].status == "present"
    # files finished before the cancel are not fetched again; the interrupted one starts over
    # (this huggingface_hub deletes a failed call's temporary file; on the real Hub, hf_xet's chunk
    # cache makes the second transfer of an interrupted file cheap)
    assert [len(g) for g in small_gets] == [1, 1, 1]
    assert len(gets) == 2


def test_gated_repository_is_refused_with_the_licence_page_and_nothing_is_present(hub_env):
    state = HubState(repos={"test/gated-orbit": Repo(tiny_diffusers_repo(1024), gated=True)})
    config = _config()
    with HubServer(state) as hub:
        import os

        os.environ["HF_ENDPOINT"] = hub.url
        try:
            with pytest.raises(PullError) as error:
                pull_models(config, ["orbit-video"])
            assert error.value.code == "model_gated"
            assert "https://huggingface.co/test/gated-orbit" in error.value.message and "accept its licence" in error.value.message
            assert "hf auth login" in error.value.message
            statuses = {st.name: st for st in model_statuses(config)}
            assert statuses["orbit-video"].status != "present"
            # with the accepted account's token in HF_TOKEN (as `hf auth login` users have it) it succeeds;
            # the token is sent to the Hub, never stored by the pull
            os.environ["HF_TOKEN"] = state.token
            pulled = pull_models(config, ["orbit-video"])
        finally:
            del os.environ["HF_ENDPOINT"]
            os.environ.pop("HF_TOKEN", None)
    assert pulled[0].status == "present"
    assert any(r["token"] == state.token for r in state.requests)
    stored = [p for p in (hub_env / "hf").rglob("*") if p.is_file() and state.token.encode() in p.read_bytes()]
    assert stored == []


def test_lpips_backbone_download_is_hash_checked_and_atomic(hub_env):
    good = bytes(range(256)) * 4000
    prefix = hashlib.sha256(good).hexdigest()[:8]
    name = f"alexnet-owt-{prefix}.pth"
    state = HubState(plain={name: good, f"vgg16-{prefix}.pth": good[::-1]})
    state.cut_once.add(name)
    dest = hub_env / "torch" / "hub" / "checkpoints"
    with HubServer(state) as hub:
        events = []
        # the connection drops halfway: the error says to pull again; the next call resumes
        with pytest.raises(PullError) as first:
            download_url(f"{hub.url}/files/{name}", dest / name, progress=lambda f, m: events.append(f))
        assert first.value.code == "download_failed" and not (dest / name).exists()
        assert (dest / f"{name}.partial").stat().st_size == len(good) // 2
        download_url(f"{hub.url}/files/{name}", dest / name)
        assert (dest / name).read_bytes() == good
        assert hub.gets(name)[-1]["range"] == f"bytes={len(good) // 2}-"
        # a file whose bytes do not match the hash in its name is refused and nothing is placed
        bad = f"vgg16-{prefix}.pth"
        with pytest.raises(PullError) as error:
            download_url(f"{hub.url}/files/{bad}", dest / bad)
    assert error.value.code == "hash_mismatch" and prefix in error.value.message
    assert not (dest / bad).exists() and not (dest / f"{bad}.partial").exists()


@pytest.mark.slow  # ~60 s on 2 busy cores: writes a scaled SV3D checkpoint, then converts it
def test_pull_of_the_official_sv3d_downloads_one_file_and_converts_it(hub_env, tmp_path):
    """`stabilityai/sv3d` is gated and holds sgm checkpoints: pull fetches sv3d_p.safetensors only
    (with the token) and converts it; the converted folder is what the loader then finds."""
    import gzip
    import json

    from im3d.diffusion.models import resolve_model_folder
    from im3d.testing.tiny_models import write_sgm_checkpoint

    manifest = json.loads(gzip.open(Path(__file__).parent / "fixtures" / "sv3d_manifest.json.gz").read())
    shapes = {name: tuple(shape) for name, shape in manifest["checkpoints"]["sv3d_p"].items()}
    checkpoint, _ = write_sgm_checkpoint(tmp_path / "sv3d_p.safetensors", shapes)
    files = {"sv3d_p.safetensors": checkpoint.read_bytes(), "sv3d_u.safetensors": b"not fetched", "README.md": b"#"}
    state = HubState(repos={"stabilityai/sv3d": Repo(files, gated=True, license="other")})
    config = _config(orbit="stabilityai/sv3d")
    events = []
    with HubServer(state) as hub:
        import os

        os.environ["HF_ENDPOINT"] = hub.url
        try:
            with pytest.raises(PullError) as error:
                pull_models(config, ["orbit-video"])
            assert error.value.code == "model_gated" and "huggingface.co/stabilityai/sv3d" in error.value.message
            (st,) = pull_models(config, ["orbit-video"], token=state.token, progress=lambda f, m: events.append((f, m)),
                                convert_options={"unet_head_dim": 16, "clip_head_dim": 16})
        finally:
            del os.environ["HF_ENDPOINT"]
    assert {r["path"].rsplit("/", 1)[-1] for r in hub.gets(".safetensors")} == {"sv3d_p.safetensors"}
    assert st.status == "present" and st.gated
    folder = resolve_model_folder("stabilityai/sv3d", config.diffusion.models_dir)
    assert folder == Path(st.path).resolve() and (folder / "unet" / "config.json").is_file()
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("converting") for _, m in events)


def test_pull_into_models_dir_and_list_remote_sizes(hub_env, capsys):
    """With diffusion.models_dir set, pull writes `<models_dir>/<org>--<name>` (what the loader looks at
    first); `im3d models list --remote --json` reports the Hub's exact sizes and licence."""
    import json
    import os

    from im3d.cli import main

    repo = tiny_diffusers_repo(4096)
    state = HubState(repos={"test/tiny": Repo(repo, license="apache-2.0")})
    models_dir = hub_env / "my-models"
    settings = ["--set", "diffusion.text_to_image_model=test/tiny", "--set", f"diffusion.models_dir={json.dumps(str(models_dir))}",
                "--set", "recon.lpips_weight=0", "--set", "diffusion.orbit_model=test/tiny"]
    with HubServer(state) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        try:
            capsys.readouterr()
            assert main(["models", "list", "--remote", "--json", *settings]) == 0
            listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
            assert listed["text-to-image"]["download_bytes"] == sum(len(repo[n]) for n in ALLOWED_TINY_FILES)
            assert listed["text-to-image"]["licence"] == "apache-2.0" and listed["text-to-image"]["status"] == "missing"
            assert main(["models", "pull", "text-to-image", *settings]) == 0
        finally:
            del os.environ["HF_ENDPOINT"]
    folder = models_dir / "test--tiny"
    assert {f for f in _snapshot_files(folder) if not f.startswith(".cache")} == ALLOWED_TINY_FILES
    capsys.readouterr()
    assert main(["models", "list", "--json", *settings]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["text-to-image"]["status"] == "present" and listed["text-to-image"]["path"] == str(folder)


def test_offline_mode_downloads_nothing(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PullError) as error:
        pull_models(_config(lpips=1.0), ["lpips-alex"])  # not even torchvision's URL is tried
    assert error.value.code == "offline" and "HF_HUB_OFFLINE" in error.value.message


def test_convert_command_refuses_what_it_cannot_convert(tmp_path, capsys):
    from im3d.cli import main

    assert main(["models", "convert", str(tmp_path / "sv3d_p.safetensors"), "--out", str(tmp_path / "out")]) != 0
    assert "checkpoint_not_found" in capsys.readouterr().err
    pickle = tmp_path / "sv3d_p.ckpt"
    pickle.write_bytes(b"\x80\x04not loaded")
    assert main(["models", "convert", str(pickle), "--out", str(tmp_path / "out")]) != 0
    assert "pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_private_xet_abort_we_call_best_effort_still_exists():
    """`pull._abort_xet` imports huggingface_hub's private `abort_xet_session` (no public API stops
    hf_xet's transfers); a huggingface_hub upgrade that moves it turns the abort into a no-op, so
    the locked version must still have it."""
    from huggingface_hub.utils._xet import abort_xet_session

    assert callable(abort_xet_session)
