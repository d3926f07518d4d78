"""A single-file checkpoint of an architecture loraforge does not adapt is refused in one line naming it, as
diffusers' own single-file loader names it; SD1 and SDXL single files keep their family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import refused, run_cli


def _zeros(shape):
    return torch.zeros(shape, dtype=torch.float16)


# The tensors that tell these architectures apart (with the shapes that tell them), beside the prefixes an SD1
# file has, so the old key-prefix check alone took each of them for SD1.
SD1_PREFIXES = {
    "cond_stage_model.transformer.text_model.final_layer_norm.bias": (8,),
    "first_stage_model.encoder.conv_in.weight": (4, 3, 3, 3),
}
FOREIGN = {
    "v2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
           "cond_stage_model.model.ln_final.bias": (1024,)},
    "inpainting": {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3), **SD1_PREFIXES},
    "xl_refiner": {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
                   "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)},
    # FLUX.1 Fill (inpainting): 384 input channels of packed image, mask and masked image; dev and schnell load
    "flux-fill": {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,),
                  "model.diffusion_model.guidance_in.in_layer.bias": (8,),
                  "model.diffusion_model.img_in.weight": (8, 384)},
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_checkpoint_of_another_architecture_is_refused_naming_it(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: _zeros(s) for k, s in FOREIGN[kind].items()}, str(path))
    home = tmp_path / "home"
    before = run_cli(home, "registry", "ls", "--json").output
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "m", "--kind", "checkpoint", ok=False))
    assert f"is a '{kind}'" in line and "SD1.x, SDXL and Flux" in line, line
    assert run_cli(home, "registry", "ls", "--json").output == before
    # The same refusal where a single file is a base: fusing into it.
    run_cli(home, "registry", "import", _adapter(tmp_path), "--name", "a")
    out = tmp_path / "fused.safetensors"
    line = refused(run_cli(home, "lora", "fuse", str(path), "a", "-o", str(out), ok=False))
    assert "SD1.x, SDXL and Flux" in line and not out.exists()


def _adapter(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 1, 1, 1)}, str(path))
    return str(path)


@pytest.mark.parametrize("builtin,family", [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")])
def test_sd1_and_sdxl_single_files_keep_their_family(tmp_path, builtin, family):
    from loraforge.models.builtin import ensure_builtin
    from loraforge.models.single_file import write_single_file

    single = tmp_path / f"{builtin}.safetensors"
    write_single_file(ensure_builtin(builtin, tmp_path / "home"), family, single)
    home = tmp_path / "home"
    result = run_cli(home, "registry", "import", str(single), "--name", "m", "--kind", "checkpoint", "--json")
    assert json.loads(result.output)["base"]["family"] == family
