"""Recipe sweeps: one step per point of a product of values, each named by its values and built incrementally."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import Field

from loraforge.plugins import STEP_KINDS
from loraforge.recipes.step_kind import Spec, SpecReference, StepKind
from loraforge.registry import Registry

from cli_helpers import refused, run_cli

sys.path.insert(0, str(Path(__file__).parent))
import recipe_fake_trainer  # noqa: E402  (registers the `recipe_fake` trainer)


class CollectSpec(Spec):
    refs: list[str] = Field(description="Artifacts to read.")


@STEP_KINDS.register("sweep_test_collect")
class Collect(StepKind):
    """Records the exact references it was given (a stand-in for a step that reads a list of artifacts)."""

    spec_class = CollectSpec
    makes_artifact = False
    seen: list[list[str]] = []

    def references(self, spec):
        return [SpecReference(("refs", i), "artifact", ref) for i, ref in enumerate(spec.refs)]

    def run(self, ctx):
        Collect.seen.append(list(ctx.spec.refs))


RECIPE = """\
name: sw
steps:
  personalise:
    train: {method: recipe_fake, dataset: ./data, steps: 1, resolution: 16}
    sweep: {rank: RANKS, seed: [1, 2]}
  collect:
    sweep_test_collect: {refs: ["${personalise}"]}
"""


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("x")

    def write(text: str = RECIPE, ranks: str = "[2, 4]") -> Path:
        path = tmp_path / "sw.yaml"
        path.write_text(text.replace("RANKS", ranks))
        return path

    return write


def plan_json(home, path) -> dict:
    return json.loads(run_cli(home, "recipe", "plan", str(path), "--json").output)


def test_plan_lists_every_point_with_its_values_and_a_list_reads_them_in_order(home, recipe):
    plan = plan_json(home, recipe())
    points = [s for s in plan["steps"] if s["kind"] == "train"]
    assert [(s["id"], s["sweep"], s["output"]) for s in points] == [
        ("personalise-2-1", {"rank": 2, "seed": 1}, "sw-personalise-2-1"),
        ("personalise-2-2", {"rank": 2, "seed": 2}, "sw-personalise-2-2"),
        ("personalise-4-1", {"rank": 4, "seed": 1}, "sw-personalise-4-1"),
        ("personalise-4-2", {"rank": 4, "seed": 2}, "sw-personalise-4-2"),
    ]
    collect = plan["steps"][-1]
    assert collect["id"] == "collect" and collect["depends_on"] == [s["id"] for s in points]
    table = run_cli(home, "recipe", "plan", str(recipe())).output
    assert "5 of 5 steps to run" in table and "personalise-4-2" in table

    # `after:` a swept step waits for every point.
    later = RECIPE + "  later:\n    synthetic: {kind: lora, rank: 2, seed: 3}\n    after: [personalise]\n"
    step = plan_json(home, recipe(later))["steps"][-1]
    assert step["id"] == "later" and step["depends_on"] == [s["id"] for s in points]


def test_apply_twice_builds_nothing_and_a_new_value_builds_only_its_points(home, recipe):
    recipe_fake_trainer.FakeTrainer.calls.clear()
    Collect.seen.clear()
    path = recipe()
    run_cli(home, "recipe", "apply", str(path))
    assert sorted(recipe_fake_trainer.FakeTrainer.calls) == ["sw-personalise-2-1", "sw-personalise-2-2",
                                                             "sw-personalise-4-1", "sw-personalise-4-2"]
    # The collecting step got every point's exact output, in sweep order.
    assert Collect.seen == [["sw-personalise-2-1:1", "sw-personalise-2-2:1", "sw-personalise-4-1:1",
                             "sw-personalise-4-2:1"]]
    registry = Registry(home)
    ranks = {n: registry.resolve(n).adapter.rank for n in ("sw-personalise-2-1", "sw-personalise-4-2")}
    assert ranks == {"sw-personalise-2-1": 2, "sw-personalise-4-2": 4}  # the swept value reached the trainer

    again = run_cli(home, "recipe", "apply", str(path)).output
    assert "0 step(s) run, 5 up to date" in again
    assert len(recipe_fake_trainer.FakeTrainer.calls) == 4

    run_cli(home, "recipe", "apply", str(recipe(ranks="[2, 8]")))
    assert recipe_fake_trainer.FakeTrainer.calls[4:] == ["sw-personalise-8-1", "sw-personalise-8-2"]
    assert Collect.seen[-1] == ["sw-personalise-2-1:1", "sw-personalise-2-2:1", "sw-personalise-8-1:1",
                                "sw-personalise-8-2:1"]

    forced = run_cli(home, "recipe", "apply", str(path), "--force", "personalise").output
    assert "5 step(s) run, 0 up to date" in forced  # --force of a swept step: all its points and what reads them
    assert len(recipe_fake_trainer.FakeTrainer.calls) == 10


METHODS = """\
name: sw
steps:
  personalise:
    train: {method: recipe_fake, dataset: ./data, instance_prompt: a sks shape, steps: 1, resolution: 16,
            prior_loss_weight: 0.5}
    output: pers
    sweep: {learning_rate: [1e-4, 5e-5], method: [recipe_fake, dreambooth_lora]}
"""


def test_methods_sweep_with_per_method_overrides(home, recipe):
    path = recipe(METHODS)
    message = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert message == (f"Error: {path.resolve()}:5:13: steps.personalise.train.prior_loss_weight: method "
                       "'recipe_fake' takes no 'prior_loss_weight' (sweep point personalise-1e-4-recipe_fake): "
                       "leave it out for that method with sweep_overrides: {recipe_fake: {prior_loss_weight: null}}")
    fixed = METHODS.replace("    output: pers\n", "    output: pers\n    sweep_overrides: {recipe_fake: "
                            "{prior_loss_weight: null}, dreambooth_lora: {learning_rate: [5.0e-3]}}\n")
    plan = plan_json(home, recipe(fixed))
    assert [(s["id"], s["output"], s["sweep"]) for s in plan["steps"]] == [
        ("personalise-1e-4-recipe_fake", "pers-1e-4-recipe_fake", {"learning_rate": "1e-4", "method": "recipe_fake"}),
        ("personalise-0.005-dreambooth_lora", "pers-0.005-dreambooth_lora",
         {"learning_rate": 0.005, "method": "dreambooth_lora"}),
        ("personalise-5e-5-recipe_fake", "pers-5e-5-recipe_fake", {"learning_rate": "5e-5", "method": "recipe_fake"}),
    ]


@pytest.mark.parametrize("sweep, where, message", [
    ("{rank: []}", "5:13",
     "steps.personalise.sweep.rank: sweep key 'rank' has an empty list: give at least one value"),
    ("{rnak: [2, 4]}", "5:13", "steps.personalise.sweep.rnak: sweep key 'rnak': this train step has no key 'rnak'"),
    ("{rank: [1, 2, 3, 4, 5, 6, 7, 8, 9], seed: [1, 2, 3, 4, 5, 6, 7, 8]}", "5:5",
     "steps.personalise.sweep: sweep of 'personalise' makes 72 points, more than 64: sweep fewer values or split "
     "it into several steps"),
    ("{rank: 2}", "5:13", "steps.personalise.sweep.rank: sweep key 'rank' needs a list of values (got 2): "
                          "write rank: [2, ...]"),
    ("{rank: [2, 2]}", "5:23", "steps.personalise.sweep.rank.1: sweep key 'rank' lists 2 twice"),
])
def test_sweep_errors_are_one_line_at_their_position(home, recipe, sweep, where, message):
    path = recipe(RECIPE.replace("{rank: RANKS, seed: [1, 2]}", sweep))
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line.startswith(f"Error: {path.resolve()}:{where}: {message}"), line
    assert not Registry(home).list()


def test_a_swept_step_in_a_scalar_place_is_refused(home, recipe):
    path = recipe(RECIPE + "  mix:\n    lora_merge: {method: concat, adapters: [{ref: \"${personalise}\"}]}\n")
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line == (f"Error: {path.resolve()}:9:46: steps.mix.lora_merge.adapters.0.ref: ${{personalise}} is a swept "
                    "step (4 points): use it inside a list, e.g. refs: [${personalise}], which reads every point, "
                    "or name one point, e.g. ${personalise-2-1}")


def test_one_point_is_named_by_its_id_and_a_missing_point_is_refused(home, recipe):
    one = RECIPE + "  best:\n    lora_merge: {method: concat, adapters: [{ref: \"${personalise-4-2}\"}]}\n"
    step = plan_json(home, recipe(one))["steps"][-1]
    assert step["id"] == "best" and step["depends_on"] == ["personalise-4-2"]
    path = recipe(one.replace("personalise-4-2", "personalise-8-2"))
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line == (f"Error: {path.resolve()}:9:46: steps.best.lora_merge.adapters.0.ref: ${{personalise-8-2}}: "
                    "sweep 'personalise' has no point 'personalise-8-2' (its points: personalise-2-1, "
                    "personalise-2-2, personalise-4-1, personalise-4-2)")
