"""`loraforge generate`: adapters change the image by their weight; weight 0 is the base."""

from __future__ import annotations

import numpy as np
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
