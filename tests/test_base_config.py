"""Single-file bases need the configs and tokenizer of a diffusers folder: `--config DIR` names it, the builtin's
are used only for a file of exactly the builtin's architecture, and anything else is a one-line refusal.

Whether a folder fits a file is decided by diffusers' own single-file converters (what `from_single_file`
loads with); the files here are either partial (refusals) or the builtins written as single files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import refused, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def partial_single_file(path: Path, family: str = "sd1") -> Path:
    """A file with a full checkpoint's prefixes (so its family is known) but the shapes of a real SD1.5."""
    text = "cond_stage_model." if family == "sd1" else "conditioner.embedders.1."
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               f"{text}transformer.text_model.final_layer_norm.weight": torch.ones(8)}, path)
    return path


def generate_args(base: Path | str, out: Path, *extra: str) -> list[str]:
    return ["generate", "--base", str(base), "--prompt", "red stripes", "--steps", "1", "--size", "32",
            "-o", str(out), *extra]


def test_a_single_file_without_configs_offline_is_one_line_naming_the_file_and_the_fix(home, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    file = partial_single_file(tmp_path / "sd15-pruned.safetensors")
    line = refused(run_cli(home, *generate_args(file, tmp_path / "x.png"), ok=False))
    assert "sd15-pruned.safetensors" in line and "--config DIR" in line
    assert not (tmp_path / "x.png").exists()


def test_config_of_another_architecture_is_refused_with_the_first_difference(home, tmp_path, tiny_sd_path):
    file = partial_single_file(tmp_path / "sd15.safetensors")
    line = refused(run_cli(home, *generate_args(file, tmp_path / "x.png", "--config", str(tiny_sd_path)), ok=False))
    assert line.startswith(f"Error: --config {tiny_sd_path} is not the architecture of sd15.safetensors: ")


def test_config_of_another_family_is_refused(home, tmp_path, tiny_sdxl_path):
    file = partial_single_file(tmp_path / "sd15.safetensors")
    line = refused(run_cli(home, *generate_args(file, tmp_path / "x.png", "--config", str(tiny_sdxl_path)), ok=False))
    assert line == (f"Error: --config {tiny_sdxl_path} holds an sdxl pipeline but base {file} is an sd1 checkpoint; "
                    "name an sd1 diffusers folder")


def test_config_that_is_not_a_diffusers_folder_is_refused(home, tmp_path):
    file = partial_single_file(tmp_path / "sd15.safetensors")
    line = refused(run_cli(home, *generate_args(file, tmp_path / "x.png", "--config", str(tmp_path)), ok=False))
    assert line == (f"Error: --config {tmp_path} is not a diffusers pipeline folder (no model_index.json); "
                    "name a local diffusers folder of the same architecture as the base")


def test_config_with_a_diffusers_folder_base_is_refused_not_ignored(home, tmp_path, tiny_sd_path):
    line = refused(run_cli(home, *generate_args("builtin:tiny-sd", tmp_path / "x.png", "--config", str(tiny_sd_path)),
                           ok=False))
    assert line == ("Error: --config {} is for single-file bases; builtin:tiny-sd is a diffusers folder with its own "
                    "configs: drop --config").format(tiny_sd_path)


def test_train_refuses_a_wrong_config_before_registering_anything(home, tmp_path, tiny_sd_path):
    from loraforge.registry import Registry
    from test_train import pattern_images

    data = pattern_images(tmp_path / "data", "stripes", n=2, caption="red stripes")
    file = partial_single_file(tmp_path / "sd15.safetensors")
    line = refused(run_cli(home, "train", "lora", "--name", "x", "--base", str(file), "--config", str(tiny_sd_path),
                           "--dataset", str(data), "--steps", "1", "--resolution", "32", ok=False))
    assert "is not the architecture of sd15.safetensors" in line
    assert Registry(home).list() == []
