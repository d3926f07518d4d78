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


# ---- the builtins written as single files (models.single_file's inverse of diffusers' converters) -------

@pytest.fixture(scope="module", params=[("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")], ids=["sd1", "sdxl"])
def single(request, tmp_path_factory, builtin_home):
    """(builtin name, its diffusers folder, the same model as one single file)."""
    from safetensors.torch import load_file

    from loraforge.models import single_file as sf
    from loraforge.models.builtin import ensure_builtin

    name, family = request.param
    folder = ensure_builtin(name, builtin_home)
    keymap = sf.template_for(sf.folder_shapes(folder, family), family, sf.configs_from_folder(folder, family))
    state = {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
             for c in sf.COMPONENTS[family]}
    path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    save_file(sf.to_single_file(state, keymap), str(path))
    return name, folder, path


def configs_only(folder: Path, dst: Path) -> Path:
    """A copy of a diffusers folder with its configs and tokenizers but no weights (what --config needs)."""
    import shutil

    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def trained_adapter(home: Path, name: str):
    from loraforge.formats import read_adapter
    from loraforge.registry import Registry

    registry = Registry(home)
    return read_adapter(registry.primary_file(registry.resolve(f"{name}:1")))[0]


def test_training_on_a_single_file_gives_the_adapter_the_folder_gives(home, tmp_path, single):
    from test_train import pattern_images

    name, folder, path = single
    data = pattern_images(tmp_path / "data", "stripes", n=2, caption="red stripes")
    common = ["--dataset", str(data), "--steps", "3", "--resolution", "32", "--rank", "2", "--learning-rate", "1e-2",
              "--validation-steps", "1", "--batch-size", "2", "--train-text-encoder"]
    run_cli(home, "train", "lora", "--name", "from-folder", "--base", f"builtin:{name}", *common)
    run_cli(home, "train", "lora", "--name", "from-file", "--base", str(path), *common)
    run_cli(home, "train", "lora", "--name", "from-file-config", "--base", str(path),
            "--config", str(configs_only(folder, tmp_path / "configs")), *common)
    folder_state = trained_adapter(home, "from-folder")
    assert len(folder_state) > 0
    for other in ("from-file", "from-file-config"):
        state = trained_adapter(home, other)
        assert sorted(state.keys()) == sorted(folder_state.keys())
        for key, module in folder_state.items():
            for a, b in ((state[key].up, module.up), (state[key].down, module.down)):
                assert float((a - b).norm()) <= 1e-6 * max(float(b.norm()), 1e-12), (other, key)


def test_generate_from_a_single_file_makes_the_folders_image(home, tmp_path, single):
    import numpy as np
    from PIL import Image

    name, folder, path = single
    run_cli(home, *generate_args(f"builtin:{name}", tmp_path / "folder.png"))
    run_cli(home, *generate_args(path, tmp_path / "file.png", "--config", str(configs_only(folder, tmp_path / "cfg"))))
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("folder", "file"))
    assert a.shape == b.shape and np.abs(a - b).max() == 0


def test_a_file_with_a_tensor_the_configs_do_not_place_is_not_given_the_builtins_configs(home, tmp_path, single,
                                                                                          monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import load_file

    name, folder, path = single
    state = load_file(str(path))
    state["model.diffusion_model.output_blocks.9.0.in_layers.2.weight"] = torch.zeros(4, 4, 3, 3)
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd))
    line = refused(run_cli(home, *generate_args(odd, tmp_path / "x.png", "--config", str(folder)), ok=False))
    assert line == (f"Error: --config {folder} is not the architecture of odd.safetensors: the file's "
                    "model.diffusion_model.output_blocks.9.0.in_layers.2.weight has no place in the folder's configs")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = refused(run_cli(home, *generate_args(odd, tmp_path / "x.png"), ok=False))
    assert "odd.safetensors" in line and "--config DIR" in line
