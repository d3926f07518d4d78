"""Publish gates: a recipe's `publish:` entry pushes a version only when its recorded metrics pass."""

from __future__ import annotations

import json

import pytest

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.recipes.gates import Gate, GateFailed, check_gates
from loraforge.registry import Registry
from loraforge.registry.evaluations import record_metrics
from loraforge.registry.importer import import_artifact
from loraforge.synthetic import random_lora

from cli_helpers import refused, run_cli
from test_hub import hub  # noqa: F401  (the local Hub fixture)


def make_versions(home, tiny_sd_path, tmp_path, n: int) -> Registry:
    """`style:1` … `style:n`, random LoRAs of different seeds."""
    registry = Registry(home)
    shapes = module_shapes(tiny_sd_path)
    for seed in range(1, n + 1):
        path = tmp_path / f"style-{seed}.safetensors"
        write_adapter(random_lora(shapes, rank=2, seed=seed), path, "kohya")
        import_artifact(registry, path, "style")
    return registry


def score(registry, ref: str, **metrics: float) -> None:
    record_metrics(registry, ref, metrics, evaluators={m: "1" for m in metrics}, prompts=["a red circle"],
                   seeds=[0], settings={"sampler": "ddim", "steps": 4, "guidance": 4.0, "size": 32})


def publish_recipe(tmp_path, artifact: str, gates: dict) -> str:
    path = tmp_path / f"gate-{artifact.replace(':', '-')}.yaml"
    path.write_text("name: gate\nsteps: {}\npublish:\n"
                    f"  - {{artifact: \"{artifact}\", repo: me/style, gates: {json.dumps(gates)}}}\n")
    return str(path)


def apply_refused(home, recipe: str) -> str:
    """The `Error: …` line of an apply that must fail: exit 1, one error line after the progress, no traceback."""
    result = run_cli(home, "recipe", "apply", recipe, ok=False)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


def repo_state(hub):  # noqa: F811
    repo = hub.state.repos["me/style"]
    return dict(repo.tags), dict(repo.branches), len(repo.commits)


def test_a_regression_blocks_the_push_and_within_tolerance_it_goes(home, hub, tiny_sd_path, tmp_path):  # noqa: F811
    registry = make_versions(home, tiny_sd_path, tmp_path, 2)
    gates = {"clip_score": {"no_regression_vs": "previous", "tolerance": 0.01}}
    score(registry, "style:1", clip_score=0.30)
    first = run_cli(home, "recipe", "apply", publish_recipe(tmp_path, "style:1", gates)).output
    assert ("gate clip_score: no earlier version of style has a clip_score score, so no_regression_vs: previous "
            "passes for style:1") in first
    before = repo_state(hub)
    assert "v1" in before[0]

    score(registry, "style:2", clip_score=0.25)
    line = apply_refused(home, publish_recipe(tmp_path, "style:2", gates))
    assert line == ("Error: step 'publish-1' failed: publish blocked: clip_score 0.25 < 0.29 "
                    "(style:1 scored 0.3, tolerance 0.01) for style:2")
    assert repo_state(hub) == before  # nothing was pushed

    score(registry, "style:2", clip_score=0.295)  # scored again: the latest record counts
    passed = run_cli(home, "recipe", "apply", publish_recipe(tmp_path, "style:2", gates)).output
    assert "gate clip_score: 0.295 >= 0.29 (style:1 scored 0.3, tolerance 0.01) for style:2" in passed
    tags = repo_state(hub)[0]
    assert set(tags) == {"v1", "v2"}
    files = hub.state.repos["me/style"].commits[tags["v2"]].files
    assert "pytorch_lora_weights.safetensors" in files


def test_a_min_gate_blocks_before_the_repo_is_created(home, hub, tiny_sd_path, tmp_path):  # noqa: F811
    registry = make_versions(home, tiny_sd_path, tmp_path, 1)
    score(registry, "style:1", shapes=0.41)
    line = apply_refused(home, publish_recipe(tmp_path, "style:1", {"shapes": {"min": 0.5}}))
    assert line == "Error: step 'publish-1' failed: publish blocked: shapes 0.41 < min 0.5 for style:1"
    assert "me/style" not in hub.state.repos


@pytest.mark.parametrize("scores, gates, blocked", [
    ({1: {"shapes": 0.41}}, {"shapes": {"max": 0.3}}, "shapes 0.41 > max 0.3 for style:1"),
    ({1: {"shapes": 0.41}}, {"shapes": {"min": 0.4, "max": 0.5}}, None),
    ({1: {"shapes": 0.41}}, {"clip_score": {"min": 0.1}},
     "style:1 has no clip_score score: score it first (an eval step with refs: [style:1] and metrics: [clip_score], "
     "or `loraforge eval style:1 --metric clip_score`)"),
    # previous = the newest earlier version that has the metric: style:2 has none, so style:3 is held to style:1
    ({1: {"shapes": 0.6}, 2: {"clip_score": 0.3}, 3: {"shapes": 0.5}}, {"shapes": {"no_regression_vs": "previous"}},
     "shapes 0.5 < 0.6 (style:1 scored 0.6) for style:3"),
    ({1: {"dist": 0.2}, 2: {"dist": 0.3}}, {"dist": {"no_regression_vs": "previous", "better": "lower"}},
     "dist 0.3 > 0.2 (style:1 scored 0.2) for style:2"),
    ({1: {"dist": 0.2}, 2: {"dist": 0.25}},
     {"dist": {"no_regression_vs": "previous", "better": "lower", "tolerance": 0.1}}, None),
    ({1: {"a": 0.2, "b": 0.2}}, {"a": {"min": 0.5}, "b": {"min": 0.5}}, "a 0.2 < min 0.5 for style:1 (and 1 more "
                                                                          "failing gate)"),
])
def test_gates(home, tiny_sd_path, tmp_path, scores, gates, blocked):
    registry = make_versions(home, tiny_sd_path, tmp_path, max(scores))
    for version, metrics in scores.items():
        score(registry, f"style:{version}", **metrics)
    said: list[str] = []
    parsed = {metric: Gate.model_validate(gate) for metric, gate in gates.items()}
    ref = f"style:{max(scores)}"
    if blocked is None:
        check_gates(registry, ref, parsed, echo=said.append)
        assert len(said) == len(gates)
    else:
        with pytest.raises(GateFailed) as exc:
            check_gates(registry, ref, parsed, echo=said.append)
        assert str(exc.value) == f"publish blocked: {blocked}"


GATED = """\
name: gated
steps:
  style:
    synthetic: {kind: lora, rank: 2, seed: 3}
  derived:
    lora_merge: {method: concat, adapters: [{ref: "${style}"}]}
  score:
    eval: {refs: ["${style}", "${derived}"], metrics: [clip_score], prompts: [a red circle], seeds: [0], steps: 2}
publish:
  - {artifact: "${style}", repo: me/style, gates: GATES}
"""


def test_a_gated_publish_waits_for_the_eval_steps_that_score_its_artifact(home, tmp_path):
    path = tmp_path / "gated.yaml"
    path.write_text(GATED.replace("GATES", "{clip_score: {min: 0.2}}"))
    plan = json.loads(run_cli(home, "recipe", "plan", str(path), "--json").output)
    order = [s["id"] for s in plan["steps"]]
    assert order == ["style", "derived", "score", "publish-1"]
    assert plan["steps"][-1]["depends_on"] == ["style", "score"]
    path.write_text(GATED.replace(", gates: GATES", ""))  # without gates it does not wait
    ungated = json.loads(run_cli(home, "recipe", "plan", str(path), "--json").output)
    assert [s["id"] for s in ungated["steps"]] == ["style", "derived", "publish-1", "score"]


@pytest.mark.parametrize("gates, where, message", [
    ("{clip_score: {mn: 0.2}}", "10:65", "publish.0.gates.clip_score.mn: unknown field 'mn'"),
    ("{clip_score: {min: 0.6, max: 0.5}}", "10:52", "publish.0.gates.clip_score: min 0.6 > max 0.5: no value "
                                                    "passes; swap them"),
    ("{clip_score: {no_regression_vs: latest}}", "10:65", "publish.0.gates.clip_score.no_regression_vs: Input "
                                                          "should be 'previous' (got 'latest')"),
    ("{clip_score: {min: 0.1, tolerance: 0.1}}", "10:52", "publish.0.gates.clip_score: tolerance applies to "
                                                "no_regression_vs: add no_regression_vs: previous or drop it"),
    ("{shapes: {min: 0.5}}", "10:52", "publish.0.gates.shapes: gate on 'shapes', which no step computes for "
                                      "${style}; the eval steps scoring it (score) compute clip_score: add an eval "
                                      "step with refs: [${style}] and metrics: [shapes]"),
])
def test_validate_refuses_bad_gates_in_one_line(home, tmp_path, gates, where, message):
    path = tmp_path / "gated.yaml"
    path.write_text(GATED.replace("GATES", gates))
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line == f"Error: {path.resolve()}:{where}: {message}"
    assert not Registry(home).list()


def test_a_gate_on_a_step_output_with_no_eval_step_is_refused(home, tmp_path):
    path = tmp_path / "gated.yaml"
    path.write_text(GATED.replace("GATES", "{clip_score: {min: 0.2}}").replace(
        '  score:\n    eval: {refs: ["${style}", "${derived}"], metrics: [clip_score], prompts: [a red circle], '
        'seeds: [0], steps: 2}\n', ""))
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line.endswith("publish.0.gates.clip_score: gate on 'clip_score', which no step computes for ${style}: "
                         "add an eval step with refs: [${style}] and metrics: [clip_score]")


E2E = """\
name: e2e
steps:
  style:
    synthetic: {kind: lora, rank: 2, seed: 3}
  variant:
    synthetic: {kind: lora, rank: 2, seed: 3}
    sweep: {seed: [4, 5]}
  score:
    eval: {refs: ["${style}", "${variant}"], metrics: ["python:gate_metrics:brightness"], prompts: [a red circle],
           seeds: [0], steps: 2, size: 32}
publish:
  - {artifact: "${style}", repo: me/style, gates: {"python:gate_metrics:brightness": {max: MAX}}}
"""


def test_the_eval_step_scores_every_point_and_the_gate_reads_what_it_recorded(home, hub, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    from loraforge.registry.evaluations import metrics_of

    (tmp_path / "gate_metrics.py").write_text(
        "import numpy as np\n\n\ndef brightness(images, prompts):\n"
        "    return [float(np.asarray(im.convert('RGB'), dtype=np.float64).mean() / 255) for im in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = "python:gate_metrics:brightness"
    path = tmp_path / "e2e.yaml"
    path.write_text(E2E.replace("MAX", "0"))
    line = apply_refused(home, str(path))
    registry = Registry(home)
    scored = {ref: metrics_of(registry, ref) for ref in ("e2e-style:1", "e2e-variant-4:1", "e2e-variant-5:1")}
    assert all(metric in m for m in scored.values())  # the list `${variant}` reached the eval step as both points
    value = scored["e2e-style:1"][metric]["value"]
    assert line == f"Error: step 'publish-1' failed: publish blocked: {metric} {value:.4g} > max 0 for e2e-style:1"
    assert "me/style" not in hub.state.repos

    path.write_text(E2E.replace("MAX", "1"))
    out = run_cli(home, "recipe", "apply", str(path)).output
    assert "1 step(s) run, 4 up to date" in out  # only the publish: the scores are reused
    assert f"gate {metric}: {value:.4g} <= max 1 for e2e-style:1" in out
    assert "v1" in hub.state.repos["me/style"].tags


def test_a_gate_on_one_sweep_point_scored_through_the_swept_list(home, tmp_path):
    path = tmp_path / "point.yaml"
    path.write_text(E2E.replace('artifact: "${style}"', 'artifact: "${variant-5}"').replace("MAX", "1"))
    plan = json.loads(run_cli(home, "recipe", "plan", str(path), "--json").output)
    assert plan["steps"][-1]["depends_on"] == ["variant-5", "score"]


def test_a_publish_of_an_output_by_its_registry_name_is_refused(home, tmp_path):
    path = tmp_path / "gated.yaml"
    path.write_text(GATED.replace('"${style}", repo', '"gated-style", repo').replace("GATES", "{}"))
    line = refused(run_cli(home, "recipe", "validate", str(path), ok=False))
    assert line == (f"Error: {path.resolve()}:10:6: publish.0.artifact: gated-style is the output of step 'style': "
                    "write artifact: ${style}, so the publish waits for that step and pushes the version this apply "
                    "builds")
