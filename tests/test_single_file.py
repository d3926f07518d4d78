"""Single-file checkpoints ⇄ diffusers folders through diffusers' own converters (models.single_file).

The consumer is diffusers: `from_single_file` loads the single files loraforge writes, and every tensor of
every component must equal the diffusers folder's bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.models import single_file as sf
from loraforge.models.builtin import ensure_builtin

CASES = [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")]


def _folder_state(folder, family):
    return {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
            for c in sf.COMPONENTS[family]}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def single_file(request, tmp_path_factory, builtin_home):
    name, family = request.param
    folder = ensure_builtin(name, builtin_home)
    configs = sf.configs_from_folder(folder, family)
    keymap = sf.template_for(sf.folder_shapes(folder, family), family, configs)
    state = sf.to_single_file(_folder_state(folder, family), keymap)
    path = tmp_path_factory.mktemp(name) / "model.safetensors"
    save_file(state, str(path))
    return folder, family, path, configs


def test_from_single_file_loads_the_inverse_bit_exactly(single_file):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder, family, path, _ = single_file
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=torch.float32)
    expected = _folder_state(folder, family)
    if family == "sdxl":
        # tiny-sdxl's two text encoders have the same width, so from_single_file takes embedders.0 for both
        # (it tells them apart by width); text_encoder_2 is checked against diffusers' open-clip converter
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        converted = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(path),
                                                 prefix="conditioner.embedders.1.model.")
        te2 = expected.pop("text_encoder_2")
        assert set(converted) == set(te2)
        for key, tensor in te2.items():
            assert torch.equal(converted[key], tensor), f"text_encoder_2.{key} differs"
    for component, tensors in expected.items():
        loaded = getattr(pipe, component).state_dict()
        for key, tensor in tensors.items():
            got = loaded.get(key, loaded.get(key.removeprefix("text_model.")))
            assert got is not None, f"{component}.{key} not loaded"
            assert torch.equal(got, tensor), f"{component}.{key} differs"


def test_single_file_layout_is_the_original_one(single_file):
    """The names and shapes A1111/ComfyUI read: SGM block names, 1×1-conv VAE attention, fused open-clip q/k/v."""
    _, family, path, _ = single_file
    shapes = {k: tuple(v.shape) for k, v in load_file(path).items()}
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in shapes
    assert len(shapes["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4
    if family == "sdxl":
        w = shapes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert w[0] == 3 * w[1]
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in shapes


def test_single_to_diffusers_to_single_is_bit_exact(single_file):
    _, family, path, configs = single_file
    state = load_file(path)
    keymap = sf.KeyMap.build({k: tuple(v.shape) for k, v in state.items()}, family, configs)
    back = sf.to_single_file(sf.to_diffusers(state, keymap), keymap)
    assert list(back) == list(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key


# ---- single files wherever a checkpoint is accepted ---------------------------------------------------

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "q_proj", "k_proj", "v_proj", "fc1")


def _adapter(folder, family, tmp_path):
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    components = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    state = random_lora(module_shapes(folder), rank=4, alpha=2.0, components=components, targets=TARGETS,
                        seed=7, std=0.3)
    path = tmp_path / "style.safetensors"
    write_adapter(state, path, "kohya")
    return path


def test_fuse_into_a_single_file_equals_fusing_into_the_folder(single_file, home, tmp_path):
    from cli_helpers import run_cli as run

    folder, family, path, configs = single_file
    adapter = _adapter(folder, family, tmp_path)
    run(home, "lora", "fuse", str(folder), f"{adapter}=0.8", "--dtype", "fp32", "-o", str(tmp_path / "folder"))
    run(home, "lora", "fuse", str(path), f"{adapter}=0.8", "--dtype", "fp32", "-o", str(tmp_path / "fused.safetensors"))
    base, fused = load_file(path), load_file(tmp_path / "fused.safetensors")
    assert list(fused) == list(base), "the fused single file keeps the base file's keys in order"
    keymap = sf.KeyMap.build({k: tuple(v.shape) for k, v in fused.items()}, family, configs)
    converted = sf.to_diffusers(fused, keymap)
    expected = _folder_state(tmp_path / "folder", family)
    changed = 0
    for component, tensors in expected.items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(converted[component][key], tensor.float(), rtol=1e-6, atol=1e-7,
                                       msg=f"{component}.{key}")
    for key in base:
        changed += not torch.equal(base[key], fused[key])
    assert changed > 10, "the adapter must change the file for the comparison to mean anything"
