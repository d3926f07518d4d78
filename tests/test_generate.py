"""`loraforge generate`: adapters change the image by their weight; weight 0 is the base."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from loraforge.cli import cli
from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.synthetic import random_lora


def test_generate_with_weighted_adapter(home, tiny_sd_path, tmp_path):
    adapter = tmp_path / "a.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=4, seed=3, std=0.5), adapter, "kohya")
    runner = CliRunner()
    assert runner.invoke(cli, ["registry", "import", str(adapter), "--name", "style"]).exit_code == 0

    def gen(*extra):
        out = tmp_path / f"img{len(list(tmp_path.glob('img*.png')))}.png"
        result = runner.invoke(cli, ["generate", "--base", "builtin:tiny-sd", "--prompt", "a photo of a cat",
                                     "--seed", "1", "--steps", "4", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(out), dtype=np.float32)

    plain = gen()
    zero = gen("--lora", "style=0")
    full = gen("--lora", "style=1.0")
    half = gen("--lora", "style:1=0.5")
    assert plain.shape == (64, 64, 3)
    assert np.abs(plain - zero).max() <= 1.0
    assert np.abs(plain - full).mean() > 2.0
    assert 0 < np.abs(plain - half).mean() < np.abs(plain - full).mean()


def test_generate_bad_weight_is_a_one_line_error(home):
    result = CliRunner().invoke(cli, ["generate", "--base", "builtin:tiny-sd", "--lora", "style=abc",
                                      "--prompt", "x", "-o", "x.png"])
    assert result.exit_code == 1
    assert result.output == "Error: invalid weight in 'style=abc': write REF=NUMBER, e.g. asuka:3=0.8\n"


def test_exported_text_encoder_lora_loads_in_plain_diffusers(home, tiny_sd_path, tmp_path):
    """Our diffusers export loads from a file with `load_lora_weights` and gives W + ΔW exactly."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline

    state = random_lora(module_shapes(tiny_sd_path), rank=4, alpha=2.0, components=("unet", "text_encoder"),
                        targets=("to_q", "q_proj", "v_proj"), seed=4)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    from loraforge.formats import write_adapter

    write_adapter(state, path, "diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    reference = copy.deepcopy(pipe.text_encoder)
    pipe.load_lora_weights(str(path))
    modules = dict(reference.named_modules())
    for name, module in state.component("text_encoder").items():
        target = modules[name.removeprefix("text_model.")] if name not in modules else modules[name]
        target.weight.data += module.delta()
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = pipe.text_encoder(ids)[0], reference(ids)[0]
        base = StableDiffusionPipeline.from_pretrained(tiny_sd_path).text_encoder(ids)[0]
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, value, fix", [
    (["--size", "7"], "--size 7", "--size 8"),
    (["--size", "12"], "--size 12", "--size 16"),
    (["--size", "0"], "--size 0", "--size 8"),  # not silently the model's default
    (["--size", "-8"], "--size -8", "--size 8"),
    (["--steps", "0"], "--steps 0", "--steps 1"),
    (["--steps", "-3"], "--steps -3", "--steps 1"),
])
def test_generate_bad_size_or_steps_is_a_one_line_error(home, tmp_path, args, value, fix):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(cli, ["generate", "--base", "builtin:tiny-sd", "--prompt", "x", "-o", str(out),
                                      *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {value} ") and fix in lines[0], result.output
    assert not out.exists()


def test_a_render_step_size_that_is_not_a_multiple_of_8_is_refused_by_validate(home, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  r:\n    render: {prompts: [a cat], size: 12}\n")
    result = CliRunner().invoke(cli, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {recipe.resolve()}:3:") and "size 12" in result.output
    assert "size 16" in result.output


def test_more_steps_than_the_model_has_timesteps_is_a_one_line_error(home, tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(cli, ["generate", "--base", "builtin:tiny-sd", "--prompt", "a cat", "--steps", "1000",
                                      "--size", "8", "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip() == ("Error: steps 1000 is not below the 1000 timesteps the model was trained with: "
                                     "use at most 999")
