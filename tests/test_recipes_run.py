"""Recipes end to end: a process killed mid-apply, and the rendered grid (size, labels, sweep visible)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from loraforge.cli import cli
from loraforge.registry import Registry

HERE = Path(__file__).parent

CRASH = """\
steps:
  sibling:
    synthetic: {kind: lora, seed: 1, rank: 2}
  slow:
    train: {method: recipe_fake, dataset: ./data, rank: 2, steps: 1}
    after: [sibling]
  after_slow:
    lora_merge: {method: concat, adapters: [{ref: ${slow}}, {ref: ${sibling}}]}
"""


def fake_cli(home: Path, *args: str, sleep: float = 0.0, **kw) -> subprocess.Popen:
    env = {**os.environ, "LORAFORGE_HOME": str(home), "RECIPE_FAKE_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(HERE / "recipe_fake_trainer.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_apply_leaves_registry_consistent_and_next_apply_finishes(home, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("x")
    recipe = tmp_path / "crash.yaml"
    recipe.write_text(CRASH)
    proc = fake_cli(home, "recipe", "apply", str(recipe), sleep=60)
    for line in proc.stdout:  # the fake trainer has stored its blobs and not yet written the catalog row
        if "FAKE-TRAINER-STORED" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    registry = Registry(home)
    assert [r["name"] for r in registry.list()] == ["crash-sibling"]
    verify = CliRunner().invoke(cli, ["--home", str(home), "registry", "verify"])
    assert verify.exit_code == 0, verify.output

    done = fake_cli(home, "recipe", "apply", str(recipe), "--json")
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    steps = {s["id"]: s["action"] for s in json.loads(out[out.index("{"):])["steps"]}
    assert steps == {"sibling": "reused", "slow": "built", "after_slow": "built"}
    assert sorted(r["name"] for r in Registry(home).list()) == ["crash-after_slow", "crash-sibling", "crash-slow"]


RENDER = """\
name: sweep
steps:
  style:
    synthetic: {kind: slider, seed: 3, rank: 4, std: 0.6}
  grid:
    render:
      prompts: ["a cat"]
      seeds: [1, 2]
      sweep: {adapter: ${style}, label: age, scales: [-3, 3]}
      steps: 3
"""


@pytest.mark.slow
def test_render_grid_has_one_cell_per_prompt_seed_and_scale_and_the_sweep_shows(home, tmp_path):
    from loraforge.render.grid import image_grid

    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(RENDER)
    result = CliRunner().invoke(cli, ["--home", str(home), "recipe", "apply", str(recipe)])
    assert result.exit_code == 0, result.output
    registry = Registry(home)
    manifest = registry.resolve("sweep-grid:1")
    assert manifest.kind == "image" and manifest.provenance.recipe.step == "grid"
    assert [p.ref for p in manifest.provenance.parents][1] == "sweep-style:1"
    grid = np.asarray(Image.open(registry.primary_file(manifest)).convert("RGB")).astype(int)

    cell = manifest.metrics["cell_size"][0]
    blank = Image.new("RGB", (cell, cell))
    expected = image_grid([[blank, blank], [blank, blank]], ["a cat | seed 1", "a cat | seed 2"],
                          ["age = -3", "age = 3"], title="sweep / grid")
    assert (grid.shape[1], grid.shape[0]) == expected.size
    side = max(cell, 128)  # small cells are scaled up to 128 px

    def cell_at(row: int, col: int) -> np.ndarray:
        top = grid.shape[0] - (2 - row) * side
        left = grid.shape[1] - (2 - col) * side
        return grid[top:top + side, left:left + side]

    for row in range(2):
        assert np.abs(cell_at(row, 0) - cell_at(row, 1)).mean() > 1.0, "the slider's scale must change the image"
    assert np.abs(cell_at(0, 0) - cell_at(1, 0)).mean() > 1.0, "different seeds give different images"
    # Labels are drawn: the label strip left of the cells is not blank.
    assert (grid[:, : grid.shape[1] - 2 * side] < 128).any()
