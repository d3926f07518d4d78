"""Illusion renders from recipes: one column per view, labelled, registered with provenance."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from loraforge.cli import cli
from loraforge.registry import Registry


def write_recipe(tmp_path, body: str):
    path = tmp_path / "illusion.yaml"
    path.write_text(body)
    return path


@pytest.mark.slow
def test_illusion_render_step(home, tmp_path):
    recipe = write_recipe(tmp_path, """
name: ill
base: builtin:tiny-sd
steps:
  anagram:
    render:
      prompts: ["a photo of a cat | a photo of a dog"]
      views: [identity, vflip]
      seeds: [1]
      steps: 3
""")
    result = CliRunner().invoke(cli, ["recipe", "apply", str(recipe)])
    assert result.exit_code == 0, result.output
    reg = Registry(home)
    manifest = reg.resolve("ill-anagram")
    assert manifest.kind == "image" and manifest.provenance.method == "render:illusion"
    grid = np.asarray(Image.open(reg.checkout(manifest) / "grid.png"))
    assert manifest.metrics["columns"] == 2 and manifest.metrics["rows"] == 1
    assert grid.shape[1] > grid.shape[0]


@pytest.mark.parametrize("body, message", [
    ("views: [identity, vflip]\n      prompts: [\"only one part\"]", "has 1 part(s) for 2 views"),
    ("views: [identity, sideways]\n      prompts: [\"a | b\"]", "sideways"),
])
def test_illusion_render_validation(home, tmp_path, body, message):
    recipe = write_recipe(tmp_path, f"""
name: ill
steps:
  anagram:
    render:
      {body}
""")
    result = CliRunner().invoke(cli, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 1
    assert message in result.output and result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
