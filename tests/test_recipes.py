"""Recipes as a user drives them: plan, incremental apply, edits, locks, failures and validation errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

sys.path.insert(0, str(Path(__file__).parent))
import recipe_fake_trainer  # noqa: E402  (registers the `recipe_fake` trainer)

# a, b: random adapters; ab = a + b (exact concat); c = ab stacked with b. Editing b re-runs b, ab, c.
CHAIN = """\
name: chain
vars:
  seed_b: 2
steps:
  a:
    synthetic: {kind: lora, seed: 1, rank: 2}
  b:
    synthetic: {kind: lora, seed: ${seed_b}, rank: 2}
  ab:
    lora_merge: {method: concat, adapters: [{ref: ${a}}, {ref: ${b}, weight: 0.5}]}
  c:
    stack: {adapters: [{ref: ${ab}}, {ref: ${b}, weight: -1}]}
"""


def cli_run(home: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == code, result.output
    return result


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def plan_json(home: Path, recipe: Path, *extra: str) -> dict:
    return json.loads(cli_run(home, "recipe", "plan", str(recipe), "--json", *extra).stdout)


def actions(home: Path, recipe: Path, *extra: str) -> dict[str, str]:
    out = json.loads(cli_run(home, "recipe", "apply", str(recipe), "--json", *extra).stdout)
    return {s["id"]: s["action"] for s in out["steps"]}


def test_plan_apply_and_second_apply_runs_nothing(home, tmp_path, monkeypatch):
    recipe = write(tmp_path, CHAIN)
    plan = plan_json(home, recipe)
    assert plan["valid"] is True and plan["recipe"] == str(recipe.resolve())
    assert [s["id"] for s in plan["steps"]] == ["a", "b", "ab", "c"]
    assert {s["status"] for s in plan["steps"]} == {"stale"}
    assert plan["steps"][2]["depends_on"] == ["a", "b"]

    assert actions(home, recipe) == {"a": "built", "b": "built", "ab": "built", "c": "built"}
    plan = plan_json(home, recipe)
    assert [s["status"] for s in plan["steps"]] == ["up-to-date"] * 4
    assert plan["steps"][3]["reason"].startswith("chain-c:1 ")

    # The second apply runs no step at all (how fast that is: `python -m benchmarks recipe`).
    def no_step(kind):
        raise AssertionError(f"a {kind} step ran although every step is up to date")

    monkeypatch.setattr("loraforge.recipes.apply.runner", no_step)
    assert set(actions(home, recipe).values()) == {"reused"}
    assert [r["version"] for r in Registry(home).list(name="chain-c")] == [1]

    # Provenance names the recipe digest, the step and its input digest; lineage follows the chain.
    c = Registry(home).resolve("chain-c:1")
    assert c.provenance.recipe.step == "c"
    assert c.provenance.recipe.digest == plan["digest"]
    assert c.provenance.recipe.input_digest == plan["steps"][3]["input_digest"]
    lineage = json.loads(cli_run(home, "registry", "lineage", "chain-c:1", "--json").stdout)
    assert "chain-ab:1" in json.dumps(lineage)


def test_editing_one_step_reruns_exactly_it_and_its_descendants(home, tmp_path):
    recipe = write(tmp_path, CHAIN)
    actions(home, recipe)
    plan = plan_json(home, recipe, "--set", "seed_b=5")
    status = {s["id"]: (s["status"], s["reason"]) for s in plan["steps"]}
    assert status["a"][0] == "up-to-date"
    assert status["b"] == ("stale", "step config changed")
    assert status["ab"] == ("stale", "input ${b} changed")
    assert status["c"][0] == "stale"
    assert actions(home, recipe, "--set", "seed_b=5") == {"a": "reused", "b": "built", "ab": "built", "c": "built"}
    # Going back to the first value reuses the first outputs: nothing is rebuilt.
    assert set(actions(home, recipe).values()) == {"reused"}
    assert actions(home, recipe, "--force", "ab") == {"a": "reused", "b": "reused", "ab": "built", "c": "built"}


def test_dataset_change_makes_train_stale_and_watch_lists_it(home, tmp_path):
    data = tmp_path / "data" / "style"
    data.mkdir(parents=True)
    for i in range(2):
        (data / f"{i}.txt").write_text("a photo")
    recipe = write(tmp_path, """\
steps:
  style:
    train: {method: recipe_fake, dataset: ./data/style, rank: 2, steps: 1, seed: 3}
    output: style-lora
  both:
    lora_merge: {method: concat, adapters: [{ref: ${style}}]}
""")
    plan = plan_json(home, recipe)
    assert plan["watch"] == [str(data.resolve())]
    assert actions(home, recipe) == {"style": "built", "both": "built"}
    assert Registry(home).resolve("style-lora:1").provenance.recipe.step == "style"
    assert set(actions(home, recipe).values()) == {"reused"}

    (data / "2.txt").write_text("one more")
    plan = {s["id"]: s for s in plan_json(home, recipe)["steps"]}
    assert plan["style"]["status"] == "stale"
    assert plan["style"]["reason"] == "dataset ./data/style changed"
    assert plan["both"]["reason"] == "input ${style} changed"
    assert actions(home, recipe) == {"style": "built", "both": "built"}


def test_lock_pins_registry_versions(home, tmp_path, tiny_sd_path):
    shapes = module_shapes(tiny_sd_path)
    for seed in (1, 2):
        path = tmp_path / f"ext{seed}.safetensors"
        write_adapter(random_lora(shapes, rank=2, seed=seed), path, "kohya")
        if seed == 1:
            cli_run(home, "registry", "import", str(path), "--name", "ext", "--base", "builtin:tiny-sd")
    recipe = write(tmp_path, """\
steps:
  m:
    lora_merge: {method: concat, adapters: [{ref: ext, weight: 2}]}
""")
    actions(home, recipe)
    lock = (tmp_path / "r.yaml.lock").read_text()
    assert "pinned: ext:1" in lock

    cli_run(home, "registry", "import", str(tmp_path / "ext2.safetensors"), "--name", "ext")
    assert plan_json(home, recipe, "--locked")["steps"][0]["status"] == "up-to-date"
    assert actions(home, recipe, "--locked") == {"m": "reused"}

    plan = plan_json(home, recipe)["steps"][0]
    assert (plan["status"], plan["reason"]) == ("stale", "artifact ext now resolves to different content")
    assert actions(home, recipe) == {"m": "built"}
    assert "pinned: ext:2" in (tmp_path / "r.yaml.lock").read_text()
    assert Registry(home).resolve("r-m:2").provenance.parents[0].ref == "ext:2"


def test_locked_refuses_a_changed_file(home, tmp_path, tiny_sd_path):
    adapter = tmp_path / "x.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=1), adapter, "kohya")
    recipe = write(tmp_path, "steps:\n  x:\n    import: {path: ./x.safetensors, base: builtin:tiny-sd}\n")
    actions(home, recipe)
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=9), adapter, "kohya")
    result = cli_run(home, "recipe", "apply", str(recipe), "--locked", code=1)
    assert "changed since the lock was written" in result.output
    assert plan_json(home, recipe)["steps"][0]["reason"] == "file ./x.safetensors changed"
    assert (tmp_path / "no.yaml.lock").exists() is False
    cli_run(home, "recipe", "apply", str(write(tmp_path, CHAIN, "no.yaml")), "--locked", code=1)


def test_failing_step_stops_descendants_and_next_apply_resumes(home, tmp_path, tiny_sd_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    recipe = write(tmp_path, """\
steps:
  good:
    synthetic: {kind: lora, seed: 1, rank: 2}
  imported:
    import: {path: ./bad.safetensors, kind: lora}
  both:
    lora_merge: {method: concat, adapters: [{ref: ${good}}, {ref: ${imported}}]}
""")
    result = cli_run(home, "recipe", "apply", str(recipe), code=1)
    assert "Error: step 'imported' failed:" in result.output and "not run: both" in result.output
    assert [r["name"] for r in Registry(home).list()] == ["r-good"]
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=4), bad, "kohya")
    assert actions(home, recipe) == {"good": "reused", "imported": "built", "both": "built"}


def test_dry_run_changes_nothing(home, tmp_path):
    recipe = write(tmp_path, CHAIN)
    out = cli_run(home, "recipe", "apply", str(recipe), "--dry-run").output
    assert "would run" in out and "never built" in out
    assert Registry(home).list() == [] and not (tmp_path / "r.yaml.lock").exists()


BAD_RECIPES = [
    # (recipe text, expected "LINE:COL: field" and message fragment)
    ("steps:\n  a:\n    blend: {x: 1}\n", "3:5: steps.a.blend", "unknown step kind 'blend'"),
    ("steps:\n  a:\n    merge:\n      method: averge\n      models: [{ref: builtin:tiny-sd}, {ref: builtin:tiny-sd}]\n",
     "4:7: steps.a.merge.method", "unknown checkpoint merge method 'averge'"),
    ("steps:\n  a:\n    train: {method: nope, dataset: ./d}\n", "3:13: steps.a.train.method", "unknown trainer 'nope'"),
    ("steps:\n  a:\n    lora_merge: {adapters: [{ref: ${zzz}}]}\n", "3:30: steps.a.lora_merge.adapters.0.ref",
     "dangling reference ${zzz}"),
    ("steps:\n  a:\n    lora_merge: {adapters: [{ref: ${b}}]}\n  b:\n    lora_merge: {adapters: [{ref: ${a}}]}\n",
     "2:3: steps.a", "dependency cycle: a -> b -> a"),
    ("steps:\n  a:\n    lora_merge: {adapters: [{ref: missing-lora:3}]}\n", "3:30: steps.a.lora_merge.adapters.0.ref",
     "no artifact named 'missing-lora'"),
    ("steps:\n  a:\n    lora_merge:\n      adapters: [{ref: x, weight: heavy}]\n",
     "4:27: steps.a.lora_merge.adapters.0.weight", "valid number"),
    ("steps:\n  a:\n    render: {prompts: [p], sede: [1]}\n", "3:28: steps.a.render.sede", "unknown field 'sede'"),
    ("steps:\n  a:\n    synthetic: {kind: checkpoint}\n  b:\n    render: {prompts: [p], base: ${a}, sweep: {adapter: ${a}, scales: [1]}}\n",
     "5:48: steps.b.render.sweep.adapter", "${a} makes a checkpoint, but an adapter is needed here"),
    ("steps:\n  a:\n    synthetic: {kind: lora}\n  a:\n    synthetic: {kind: lora}\n", "4:3", "duplicate key 'a'"),
]


@pytest.mark.parametrize("text,where,message", BAD_RECIPES)
def test_validation_errors_name_file_line_column_and_field(home, tmp_path, text, where, message):
    recipe = write(tmp_path, text)
    result = cli_run(home, "recipe", "validate", str(recipe), code=1)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {recipe.resolve()}:{where}"), line
    assert message in line
    out = CliRunner().invoke(cli, ["--home", str(home), "recipe", "plan", str(recipe), "--json"])
    assert out.exit_code == 1
    body = json.loads(out.stdout)
    assert body["valid"] is False and message in body["error"]


def test_vars_set_unknown_variable_is_refused(home, tmp_path):
    recipe = write(tmp_path, CHAIN)
    result = cli_run(home, "recipe", "plan", str(recipe), "--set", "seed_c=1", code=1)
    assert "no variable 'seed_c'" in result.output and "seed_b" in result.output


def test_example_recipes_validate(home):
    root = Path(__file__).parent.parent / "recipes"
    examples = sorted(root.glob("*.yaml"))
    assert {p.name for p in examples} >= {"quickstart.yaml"}
    for path in examples:
        cli_run(home, "recipe", "validate", str(path))


def test_publish_entries_are_validated_and_skipped_with_no_publish(home, tmp_path):
    bad = write(tmp_path, CHAIN + "publish:\n  - {artifact: ${c}, repo: not a repo}\n", "bad.yaml")
    result = cli_run(home, "recipe", "validate", str(bad), code=1)
    assert f"{bad.resolve()}:14:5: publish.0" in result.output and "invalid Hub repo 'not a repo'" in result.output
    recipe = write(tmp_path, CHAIN + "publish:\n  - {artifact: ${c}, repo: me/chain}\n")
    plan = plan_json(home, recipe)
    assert plan["steps"][-1] == {**plan["steps"][-1], "id": "publish-1", "kind": "publish", "depends_on": ["c"],
                                 "status": "stale"}
    assert actions(home, recipe, "--no-publish")["publish-1"] == "skipped"
