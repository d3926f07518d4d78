"""Incremental rebuilds across upgrades: plugin versions in input digests, and the dataset digest index."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import loraforge
from loraforge.plugins import LORA_METHODS, STEP_KINDS, TRAINERS
from loraforge import hashing

from cli_helpers import run_cli

sys.path.insert(0, str(Path(__file__).parent))
import recipe_fake_trainer  # noqa: E402,F401  (registers the `recipe_fake` trainer)

RECIPE = """\
name: ver
steps:
  style:
    train: {method: recipe_fake, dataset: ./data, rank: 2, steps: 1, seed: 3}
  both:
    lora_merge: {method: concat, adapters: [{ref: ${style}}]}
"""


def _recipe(tmp_path: Path, files: int = 3) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    old = time.time() - 60  # written a while ago: old enough for the index to trust its stat
    for i in range(files):
        (data / f"{i}.txt").write_text("a photo")
        os.utime(data / f"{i}.txt", (old, old))
    recipe = tmp_path / "ver.yaml"
    recipe.write_text(RECIPE)
    return recipe


def _plan(home: Path, recipe: Path) -> dict:
    return json.loads(run_cli(home, "recipe", "plan", str(recipe), "--json").output)


def _status(plan: dict) -> dict[str, tuple[str, str]]:
    return {s["id"]: (s["status"], s["reason"]) for s in plan["steps"]}


def test_an_upgrade_of_loraforge_alone_rebuilds_nothing(home, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    run_cli(home, "recipe", "apply", str(recipe))
    monkeypatch.setattr(loraforge, "__version__", "99.0.0")
    assert {s for s, _ in _status(_plan(home, recipe)).values()} == {"up-to-date"}


@pytest.mark.parametrize("group, name, expected", [
    (STEP_KINDS, "lora_merge", {"style": "up-to-date",
                                "both": "stale: recipe step kind lora_merge version changed (1 -> 2)"}),
    (LORA_METHODS, "concat", {"style": "up-to-date",
                              "both": "stale: LoRA merge method concat version changed (1 -> 2)"}),
    (TRAINERS, "recipe_fake", {"style": "stale: trainer recipe_fake version changed (1 -> 2)",
                               "both": "stale: input ${style} changed"}),
])
def test_bumping_a_plugins_version_makes_exactly_the_steps_that_run_it_stale(home, tmp_path, monkeypatch,
                                                                             group, name, expected):
    recipe = _recipe(tmp_path)
    run_cli(home, "recipe", "apply", str(recipe))
    monkeypatch.setattr(group.get(name), "version", 2, raising=False)  # a plugin upgrade that changes numbers
    status = _status(_plan(home, recipe))
    assert {sid: s if s == "up-to-date" else f"{s}: {reason}" for sid, (s, reason) in status.items()} == expected


def test_an_unchanged_dataset_is_not_read_again_and_an_edit_is_noticed(home, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    data = str((tmp_path / "data").resolve())
    hashed: list[str] = []
    real = hashing.sha256_file

    def counting(path):
        if Path(path).parent == tmp_path / "data":
            hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(hashing, "sha256_file", counting)

    assert _plan(home, recipe)["recomputed"] == {data: 3}
    assert len(hashed) == 3
    run_cli(home, "recipe", "apply", str(recipe))
    plan = _plan(home, recipe)
    assert plan["recomputed"] == {} and len(hashed) == 3  # only stat()ed
    assert {s for s, _ in _status(plan).values()} == {"up-to-date"}
    assert "digest recomputed" not in run_cli(home, "recipe", "plan", str(recipe)).output

    # Same size, new content and mtime: the index notices, and only that file is read again.
    (tmp_path / "data" / "0.txt").write_text("b photo")
    text = run_cli(home, "recipe", "plan", str(recipe)).output
    assert f"digest recomputed: {data} (1 file hashed)" in text and hashed[3:] == ["0.txt"]
    assert _status(_plan(home, recipe))["style"] == ("stale", "dataset ./data changed")


def test_a_reward_train_steps_digest_holds_its_rewards_version(home, tmp_path, monkeypatch):
    from loraforge.plugins import REWARDS

    recipe = tmp_path / "rw.yaml"
    recipe.write_text("name: rw\nsteps:\n  bright:\n    train: {method: reward, reward: brightness, prompts: [a cat],"
                      " iterations: 1, rank: 2}\n")
    before = _plan(home, recipe)["steps"][0]["input_digest"]
    monkeypatch.setattr(REWARDS.get("brightness"), "version", "2", raising=False)
    assert _plan(home, recipe)["steps"][0]["input_digest"] != before
    recipe.write_text(recipe.read_text().replace("reward: brightness", "reward: no_such_reward"))
    result = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    assert result.exit_code == 1 and "no_such_reward" in result.output
