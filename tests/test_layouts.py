"""The other real adapter layouts users bring (PEFT patterns, diffusers adapter metadata, the old
attention-processor keys, ai-toolkit files, kohya files without or with fp16 alphas), each produced by
its owner's code where the owner is installed and checked against the owner's own loader; and the
one-line refusals of layouts loraforge does not know or architectures it does not adapt."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import FORMATS
from loraforge.registry import Registry

from cli_helpers import refused, run_cli

torch.set_num_threads(1)


# -- refusals: unknown layouts and other architectures --------------------------------------

def _detecting_formats() -> str:
    return ", ".join(sorted(name for name, fmt in FORMATS.items() if fmt.detect is not None))


def _refused_import(home: Path, path: Path) -> str:
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "x", ok=False))
    assert Registry(home).list() == []
    return line


def test_an_unknown_layout_names_its_first_unknown_key_and_the_known_formats(home, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"unet.mid_block.attn1.to_q.lora_A.weight": torch.ones(2, 4),
               "unet.mid_block.attn1.to_q.lora_B.weight": torch.ones(4, 2),
               "zz.adapter.scale": torch.ones(1)}, str(path))
    line = _refused_import(home, path)
    assert line == (f"Error: {path} is not a LoRA adapter in a known format (first unknown key: zz.adapter.scale); "
                    f"known: {_detecting_formats()}")
    assert {"diffusers", "kohya", "loraforge", "peft"} <= set(line.rsplit("known: ", 1)[1].split(", "))


def test_a_file_mixing_two_formats_names_one_key_of_each(home, tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"unet.mid_block.attn1.to_q.lora_A.weight": torch.ones(2, 4),
               "unet.mid_block.attn1.to_q.lora_B.weight": torch.ones(4, 2),
               "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2)}, str(path))
    line = _refused_import(home, path)
    assert "mixes the keys of several adapter formats" in line
    assert "kohya: lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in line
    assert "diffusers: unet.mid_block.attn1.to_q.lora_A.weight" in line


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=4, num_attention_heads=2, joint_attention_dim=8,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2))


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


@pytest.mark.parametrize("family, build, pipeline, says", [
    ("flux", _tiny_flux, "FluxPipeline", "a LoRA for Flux (key transformer.single_transformer_blocks.0.attn.to_k"),
    ("sd3", _tiny_sd3, "StableDiffusion3Pipeline", "a LoRA for a diffusion transformer (Flux, SD3, PixArt, ...)"),
])
def test_a_transformer_lora_saved_by_diffusers_says_which_architecture_it_is(home, tmp_path, family, build,
                                                                             pipeline, says):
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    model = build()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    getattr(diffusers, pipeline).save_lora_weights(str(tmp_path / family),
                                                   transformer_lora_layers=get_peft_model_state_dict(model))
    path = tmp_path / family / "pytorch_lora_weights.safetensors"
    line = _refused_import(home, path)
    assert line.startswith(f"Error: {path} is {says}"), line
    assert line.endswith("an architecture loraforge does not adapt; it adapts SD1.x and SDXL "
                         "(UNet and CLIP text encoders)")


@pytest.mark.parametrize("key, family", [
    ("lora_unet_double_blocks_0_img_attn_qkv", "Flux"),  # kohya sd-scripts' Flux names
    ("lora_unet_single_blocks_3_linear1", "Flux"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv", "SD3"),  # kohya sd-scripts' SD3 names
])
def test_kohya_files_of_other_architectures_say_which_they_are(home, tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 8), f"{key}.lora_up.weight": torch.ones(8, 2),
               f"{key}.alpha": torch.tensor(2.0)}, str(path))
    line = _refused_import(home, path)
    assert line.startswith(f"Error: {path} is a LoRA for {family} (key {key}.alpha)"), line


def test_a_peft_folder_of_a_flux_transformer_says_flux(home, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_flux(), LoraConfig(r=2, target_modules=["to_q"]))
    model.save_pretrained(str(tmp_path / "peft"))
    line = _refused_import(home, tmp_path / "peft")
    assert "is a LoRA for Flux (key base_model.model.single_transformer_blocks.0.attn.to_q" in line, line
