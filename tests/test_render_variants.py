"""Render sweeps and LyCORIS adapters: an adapter whose differences are added to the weights once (full, DoRA,
bias, norm) cannot change weight per grid column, so sweeping it is refused in one line, not rendered as
columns that silently all show the starting weight; beside it, LoRA adapters keep their own weights."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli_helpers import run_cli
from loraforge.cli import cli
from loraforge.formats.safetensors_io import tensor_shapes


def _full_diff_adapter(tmp_path, tiny_sd_path):
    shape = tensor_shapes(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    path = tmp_path / "full.safetensors"
    save_file({"lora_unet_conv_in.diff": torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5},
              str(path))
    return path


RECIPE = """\
name: sweepfull
steps:
  grid:
    render:
      prompts: ["a cat"]
      seeds: [1]
      sweep: {adapter: full:1, label: w, scales: [0, 1]}
      steps: 2
"""


def test_sweeping_a_full_difference_adapter_is_refused_in_one_line(home, tmp_path, tiny_sd_path):
    run_cli(home, "registry", "import", str(_full_diff_adapter(tmp_path, tiny_sd_path)), "--name", "full",
            "--base", "builtin:tiny-sd")
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(RECIPE)
    result = CliRunner().invoke(cli, ["--home", str(home), "recipe", "apply", str(recipe)])
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]  # apply reports each step, then the one error line
    assert line.startswith("Error: step 'grid' failed: render sweep") and "full:1" in line and "cannot change weight per column" in line, line
    assert "sweepfull-grid" not in run_cli(home, "registry", "ls").output


def test_a_full_difference_adapter_renders_beside_a_swept_lora(home, tmp_path, tiny_sd_path):
    """The full adapter is added once; the swept LoRA's columns differ (their names stay aligned with weights)."""
    import numpy as np
    from PIL import Image

    from loraforge.registry import Registry

    run_cli(home, "registry", "import", str(_full_diff_adapter(tmp_path, tiny_sd_path)), "--name", "full",
            "--base", "builtin:tiny-sd")
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text("""\
name: mixed
steps:
  style:
    synthetic: {kind: slider, seed: 3, rank: 4, std: 0.6}
  grid:
    render:
      prompts: ["a cat"]
      seeds: [1]
      adapters: [{ref: "full:1", weight: 1.0}]
      sweep: {adapter: ${style}, label: s, scales: [-3, 3]}
      steps: 2
""")
    result = CliRunner().invoke(cli, ["--home", str(home), "recipe", "apply", str(recipe)])
    assert result.exit_code == 0, result.output
    registry = Registry(home)
    manifest = registry.resolve("mixed-grid:1")
    grid = np.asarray(Image.open(registry.primary_file(manifest)).convert("RGB")).astype(int)
    side = max(manifest.metrics["cell_size"][0], 128)
    left = grid[-side:, grid.shape[1] - 2 * side: grid.shape[1] - side]
    right = grid[-side:, grid.shape[1] - side:]
    assert np.abs(left - right).mean() > 1.0, "the swept LoRA must change the image between columns"
