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

def as_single_file(folder: Path, family: str, path: Path) -> Path:
    """Diffusers folder `folder` written as one single file at `path`."""
    from safetensors.torch import load_file

    from loraforge.models import single_file as sf

    keymap = sf.template_for(sf.folder_shapes(folder, family), family, sf.configs_from_folder(folder, family))
    state = {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
             for c in sf.COMPONENTS[family]}
    save_file(sf.to_single_file(state, keymap), str(path))
    return path


@pytest.fixture(scope="module", params=[("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")], ids=["sd1", "sdxl"])
def single(request, tmp_path_factory, builtin_home):
    """(builtin name, its diffusers folder, the same model as one single file)."""
    from loraforge.models.builtin import ensure_builtin

    name, family = request.param
    folder = ensure_builtin(name, builtin_home)
    return name, folder, as_single_file(folder, family, tmp_path_factory.mktemp(name) / f"{name}.safetensors")


def configs_only(folder: Path, dst: Path) -> Path:
    """A copy of a diffusers folder with its configs and tokenizers but no weights (what --config needs)."""
    import shutil

    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def with_other_schedule(folder: Path, dst: Path) -> Path:
    """A copy of a diffusers folder whose noise schedule differs (same architecture, so the single file fits it):
    what a file loaded with these configs computes shows whether the configs were used."""
    import json
    import shutil

    shutil.copytree(folder, dst)
    path = next((dst / "scheduler").glob("scheduler_config.json"))
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "beta_end": 0.02}))
    return dst


def images_equal(a: Path, b: Path) -> bool:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
    return x.shape == y.shape and int(np.abs(x - y).max()) == 0


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
    variant = with_other_schedule(folder, tmp_path / "variant")
    run_cli(home, "train", "lora", "--name", "from-folder", "--base", f"builtin:{name}", *common)
    run_cli(home, "train", "lora", "--name", "from-file", "--base", str(path), *common)
    run_cli(home, "train", "lora", "--name", "from-variant", "--base", str(variant), *common)
    run_cli(home, "train", "lora", "--name", "from-file-config", "--base", str(path),
            "--config", str(configs_only(variant, tmp_path / "configs")), *common)

    def worst(x, y) -> float:
        assert sorted(x.keys()) == sorted(y.keys()) and len(x) > 0
        return max(float((a - b).norm() / max(float(b.norm()), 1e-12))
                   for key in y.keys() for a, b in ((x[key].up, y[key].up), (x[key].down, y[key].down)))

    states = {n: trained_adapter(home, n) for n in ("from-folder", "from-file", "from-variant", "from-file-config")}
    assert worst(states["from-file"], states["from-folder"]) <= 1e-6
    assert worst(states["from-file-config"], states["from-variant"]) <= 1e-6
    assert worst(states["from-variant"], states["from-folder"]) > 1e-3  # the config's schedule was used


def test_generate_from_a_single_file_makes_the_folders_image(home, tmp_path, single):
    name, folder, path = single
    variant = with_other_schedule(folder, tmp_path / "variant")
    run_cli(home, *generate_args(f"builtin:{name}", tmp_path / "folder.png"))
    run_cli(home, *generate_args(path, tmp_path / "file.png"))
    run_cli(home, *generate_args(variant, tmp_path / "variant.png"))
    run_cli(home, *generate_args(path, tmp_path / "file-config.png", "--config",
                                 str(configs_only(variant, tmp_path / "cfg"))))
    assert images_equal(tmp_path / "file.png", tmp_path / "folder.png")
    assert images_equal(tmp_path / "file-config.png", tmp_path / "variant.png")
    assert not images_equal(tmp_path / "variant.png", tmp_path / "folder.png")  # the config's schedule was used


def test_a_single_file_of_builtin_shapes_is_read_with_its_configs_offline(home, tmp_path, shapes_path, monkeypatch):
    # Not tiny-sd's architecture: without the shapes configs it would need the Hub, which is offline here.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = as_single_file(shapes_path, "sd1", tmp_path / "shapes.safetensors")
    args = ("--prompt", "a big red circle on a black background", "--steps", "4", "--size", "64")
    run_cli(home, "generate", "--base", "builtin:shapes", *args, "-o", str(tmp_path / "folder.png"))
    run_cli(home, "generate", "--base", str(path), *args, "-o", str(tmp_path / "file.png"))
    assert images_equal(tmp_path / "file.png", tmp_path / "folder.png")


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


def test_a_pickled_ckpt_single_file_generates_the_folders_image(home, tmp_path, single):
    from safetensors.torch import load_file

    name, _folder, path = single
    ckpt = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)  # the layout of older pickled checkpoints
    run_cli(home, *generate_args(f"builtin:{name}", tmp_path / "folder.png"))
    run_cli(home, *generate_args(ckpt, tmp_path / "ckpt.png"))
    assert images_equal(tmp_path / "ckpt.png", tmp_path / "folder.png")


RECIPE = """\
name: {name}
base: {base}
steps:
  style:
    train:
      method: lora
      dataset: {data}
      steps: 2
      resolution: 32
      rank: 2
      learning_rate: 0.01
      validation_steps: 1
{train_config}
  grid:
    render:
      prompts: ["red stripes"]
      sweep: {{adapter: "${{style}}", label: style, scales: [1]}}  # one label whatever the recipe calls it
      steps: 2
      size: 32
      title: same
{render_config}
"""


def test_recipe_train_and_render_steps_take_a_single_file_base_with_its_config(home, tmp_path, tiny_sd_path):
    from loraforge.registry import Registry
    from test_train import pattern_images

    folder, path = tiny_sd_path, as_single_file(tiny_sd_path, "sd1", tmp_path / "tiny-sd.safetensors")
    data = pattern_images(tmp_path / "data", "stripes", n=2, caption="red stripes")
    variant = with_other_schedule(folder, tmp_path / "variant")
    config = configs_only(variant, tmp_path / "cfg")
    recipes = {
        "viafolder": RECIPE.format(name="viafolder", base=variant, data=data, train_config="", render_config=""),
        "viafile": RECIPE.format(name="viafile", base=path, data=data, train_config=f"      base_config: {config}",
                                 render_config=f"      base_config: {config}"),
    }
    for recipe_name, text in recipes.items():
        (tmp_path / f"{recipe_name}.yaml").write_text(text)
        run_cli(home, "recipe", "apply", str(tmp_path / f"{recipe_name}.yaml"))
    registry = Registry(home)
    assert registry.resolve("viafile-style:1").provenance.params["base_config"] == str(config)
    grids = [registry.primary_file(registry.resolve(f"{r}-grid:1")) for r in recipes]
    assert images_equal(*grids)
    # ... and not what the builtin's own configs make of the same file (the step's base_config was used)
    (tmp_path / "plain.yaml").write_text(RECIPE.format(name="plain", base=path, data=data, train_config="",
                                                       render_config=""))
    run_cli(home, "recipe", "apply", str(tmp_path / "plain.yaml"))
    assert not images_equal(registry.primary_file(registry.resolve("plain-grid:1")), grids[1])


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory, builtin_home):
    """(diffusers folder, the same model as a single file) of an SD1 pipeline unlike the builtin: tiny-sd with
    two resnets per UNet block instead of one."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    from loraforge.models.builtin import ensure_builtin

    root = tmp_path_factory.mktemp("other")
    folder = root / "two-layers"
    shutil.copytree(ensure_builtin("tiny-sd", builtin_home), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    shutil.rmtree(folder / "unet")
    torch.manual_seed(7)
    UNet2DConditionModel.from_config({**config, "layers_per_block": 2}).save_pretrained(folder / "unet")
    return folder, as_single_file(folder, "sd1", root / "two-layers.safetensors")


def test_without_config_the_standard_configs_diffusers_names_are_fetched_and_checked(home, tmp_path, monkeypatch,
                                                                                    other_architecture, tiny_sd_path):
    import huggingface_hub

    folder, path = other_architecture
    asked = []

    def hub(configs: Path):
        def snapshot_download(repo_id, allow_patterns=None, **kwargs):
            asked.append((repo_id, allow_patterns))
            return str(configs)
        return snapshot_download

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub(configs_only(folder, tmp_path / "hub-configs")))
    run_cli(home, *generate_args(folder, tmp_path / "folder.png"))
    run_cli(home, *generate_args(path, tmp_path / "file.png"))
    assert images_equal(tmp_path / "file.png", tmp_path / "folder.png")
    repo, patterns = asked[0]
    assert repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers' choice for an SD1 file
    assert not any(p.endswith((".safetensors", ".bin")) for p in patterns)  # configs and tokenizer only

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub(tiny_sd_path))  # configs of another architecture
    line = refused(run_cli(home, *generate_args(path, tmp_path / "x.png"), ok=False))
    assert line.startswith(f"Error: single-file checkpoint two-layers.safetensors does not fit {repo}, the standard "
                           "configs diffusers names for it: ") and line.endswith("pass --config DIR of its architecture")


def test_dreambooth_class_images_are_keyed_by_the_configs_content(home, tmp_path, tiny_sd_path):
    from loraforge.plugins import TRAINERS
    from loraforge.registry import Registry
    from loraforge.train.trainers.dreambooth_lora import class_images_folder

    path = as_single_file(tiny_sd_path, "sd1", tmp_path / "tiny-sd.safetensors")
    same_a, same_b = configs_only(tiny_sd_path, tmp_path / "a"), configs_only(tiny_sd_path, tmp_path / "b")
    other = configs_only(with_other_schedule(tiny_sd_path, tmp_path / "variant"), tmp_path / "c")
    cls = TRAINERS.get("dreambooth_lora").config_class

    def folder(config):
        return class_images_folder(Registry(home), cls(base=str(path), base_config=config and str(config),
                                                       dataset="d", instance_prompt="sks", class_prompt="a dog"))

    assert folder(same_a) == folder(same_b)  # by content, not by path
    assert len({folder(None), folder(same_a), folder(other)}) == 3
