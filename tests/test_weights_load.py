"""What `im3d models pull` leaves on disk loads: fp16-variant diffusers folders, present per the registry."""

from __future__ import annotations

import pytest
import torch

from im3d.diffusion.models import load_pipeline, release_models, resolve_model_folder, weights_variant
from im3d.testing.tiny_models import build_text_to_image_model
from im3d.weights import diffusers_folder_problems, model_status


@pytest.mark.timeout(300)  # ~11 s at load 22 on 2 cores (builds and loads a tiny diffusers pipeline)
def test_fp16_variant_folder_is_present_resolves_and_loads(tmp_path):
    folder = build_text_to_image_model(tmp_path / "org--tiny")
    renamed = 0
    for path in list(folder.glob("*/*.safetensors")):  # what pull fetches where a repo has fp16 files
        path.rename(path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
        renamed += 1
    assert renamed >= 2 and weights_variant(folder) == "fp16"
    assert diffusers_folder_problems(folder) == []
    st = model_status("text-to-image", "", "org/tiny", str(tmp_path))
    assert st.status == "present" and st.path == str(folder) and st.size_on_disk > 0
    assert resolve_model_folder("org/tiny", str(tmp_path)) == folder.resolve()
    try:
        loaded = load_pipeline(folder, torch.device("cpu"), torch.float32, False)
        assert loaded.pipeline.unet.dtype == torch.float32  # fp16 files, cast to the run's dtype
    finally:
        release_models()
    # a component without weights is incomplete, and says which
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    st = model_status("text-to-image", "", "org/tiny", str(tmp_path))
    assert st.status == "incomplete" and any(p.startswith("unet/") for p in st.problems)
