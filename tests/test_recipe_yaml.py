"""Recipe YAML: anchors, aliases and merge keys work; an alias bomb is refused before it expands."""

from __future__ import annotations

import os
import re
import sys

import pytest

from loraforge.daemon.planner import plan_recipe
from loraforge.errors import RecipeError
from loraforge.recipes.loader import load_source

from cli_helpers import run_cli

# The classic "billion laughs": nine levels of nine aliases, 9**9 leaves from about 300 bytes
# (plus a one-step recipe around it).
BOMB = "vars:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
) + "steps:\n  s:\n    synthetic: {kind: lora}\n"


@pytest.mark.timeout(60)  # the unguarded loader grows without bound: fail, do not hang the suite
@pytest.mark.parametrize("command", [["recipe", "validate"], ["recipe", "apply"]])
def test_an_alias_bomb_is_refused_quickly_in_one_line(home, tmp_path, command):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    result = run_cli(home, *command, str(recipe), ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(r"bomb\.yaml:\d+:\d+: YAML aliases expand the recipe by more than 10000 nodes", lines[0])
    assert not (tmp_path / "bomb.yaml.lock").exists()


def test_the_daemon_planner_reports_an_alias_bomb_as_an_invalid_recipe(home, tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    plan = plan_recipe([sys.executable, "-m", "loraforge"], recipe,
                       {**os.environ, "LORAFORGE_HOME": str(home)}, timeout=60)
    assert not plan.valid
    assert "alias" in plan.error and "within" not in plan.error  # refused, not timed out


def test_ordinary_anchors_aliases_and_merge_keys_still_work(home, tmp_path):
    recipe = tmp_path / "anchors.yaml"
    recipe.write_text(
        "vars:\n"
        "  lora: &lora {kind: lora, rank: 2, seed: 3}\n"
        "  seeds: &seeds [0, 1]\n"
        "steps:\n"
        "  a:\n    synthetic: *lora\n"
        "  b:\n    synthetic: {<<: *lora, seed: 4}\n"  # an explicit key overrides the merged one
        "  r:\n    render: {prompts: [a cat], steps: 1, size: 32, seeds: *seeds,\n"
        "             adapters: [{ref: '${a}'}, {ref: '${b}', weight: 0.5}]}\n")
    data = load_source(recipe).data
    assert data["steps"]["a"]["synthetic"] == {"kind": "lora", "rank": 2, "seed": 3}
    assert data["steps"]["b"]["synthetic"] == {"kind": "lora", "rank": 2, "seed": 4}
    assert data["steps"]["r"]["render"]["seeds"] == [0, 1]
    result = run_cli(home, "recipe", "validate", str(recipe))
    assert "3 steps" in result.output


def test_a_repeated_explicit_key_is_still_refused(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("steps:\n  a:\n    synthetic: {kind: lora, seed: 1, seed: 2}\n")
    with pytest.raises(RecipeError, match=r"dup.yaml:3:\d+: duplicate key 'seed'"):
        load_source(recipe)


def test_a_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("vars:\n  x: &x [1, *x]\nsteps: {}\n")
    with pytest.raises(RecipeError, match=r"loop.yaml:2:\d+: .*refers to itself"):
        load_source(recipe)


def test_a_mapping_used_as_a_key_is_refused(tmp_path):
    recipe = tmp_path / "key.yaml"
    recipe.write_text("vars:\n  ? [a, b]\n  : 1\nsteps: {}\n")
    with pytest.raises(RecipeError, match=r"key.yaml:2:\d+: .*key"):
        load_source(recipe)


def test_aliases_within_the_budget_load(tmp_path):
    # Three levels of ten aliases: 1,000 leaves, well within the budget.
    text = "vars:\n  a: &a [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n  b: &b [" + ", ".join(["*a"] * 10) + "]\n" \
           "  c: [" + ", ".join(["*b"] * 10) + "]\nsteps: {}\n"
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(text)
    assert sum(len(a) for b in load_source(recipe).data["vars"]["c"] for a in b) == 1000


@pytest.mark.timeout(60)
def test_an_alias_bomb_in_a_lock_file_is_refused(home, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  s:\n    synthetic: {kind: lora}\n")
    (tmp_path / "r.yaml.lock").write_text(BOMB)
    result = run_cli(home, "recipe", "apply", "--locked", str(recipe), ok=False)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "lock file" in lines[0] and "YAML aliases expand the lock file by more than 10000 nodes" in lines[0]


@pytest.mark.timeout(60)
def test_an_alias_bomb_in_a_model_cards_front_matter_is_not_expanded():
    from loraforge.hub.card import parse_front_matter

    assert parse_front_matter("---\n" + BOMB + "---\n# card\n") == {}
    assert parse_front_matter("---\nbase: &b x\nother: *b\n---\n") == {"base": "x", "other": "x"}


@pytest.mark.parametrize("text, message", [
    ("steps:\n  s:\n    synthetic: *nope\n", r"r\.yaml:3:16: not valid YAML: found undefined alias 'nope'$"),
    ("steps:\n  s:\n    synthetic: {kind: lora\n", r"r\.yaml:4:1: not valid YAML: expected ',' or '}', but got"),
])
def test_invalid_yaml_is_reported_at_its_position_with_what_was_found(home, tmp_path, text, message):
    # Documents are read with libyaml when PyYAML has it; what it refuses is read again for PyYAML's words.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    lines = run_cli(home, "recipe", "validate", str(recipe), ok=False).output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_a_damaged_lock_file_names_what_is_wrong(home, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  s:\n    synthetic: {kind: lora}\n")
    (tmp_path / "r.yaml.lock").write_text("steps: *gone\n")
    lines = run_cli(home, "recipe", "plan", str(recipe), ok=False).output.strip().splitlines()
    assert len(lines) == 1 and "r.yaml.lock is damaged" in lines[0] and "found undefined alias 'gone'" in lines[0]
