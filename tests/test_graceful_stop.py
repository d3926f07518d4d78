"""SIGTERM (what the daemon sends to let a job checkpoint): every trainer stops at a checkpoint and resumes
from it, and `recipe apply` stops as a whole — no later step starts, the exit is non-zero with one line."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.errors import Stopped
from loraforge.plugins import TRAINERS
from loraforge.registry import Registry
from test_train import FAST, adapter_state, pattern_images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def sigterm_after_step(monkeypatch):
    """`arm(n)`: this process gets a real SIGTERM right after its n-th optimiser step (of any trainer)."""
    import loraforge.train.loop as loop

    real = loop.make_optimizer
    when = {"step": None, "count": 0}

    def make_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def counted(*a, **k):
            out = step(*a, **k)
            when["count"] += 1
            if when["count"] == when["step"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        optimizer.step = counted
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)

    def arm(n: int | None) -> None:
        when.update(step=n, count=0)

    yield arm
    arm(None)


NO_LORA = {k: v for k, v in FAST.items() if k not in ("rank", "alpha")}  # full fine-tunes and TI refuse LoRA options


def _configs(tmp_path: Path) -> dict[str, dict]:
    stripes = str(pattern_images(tmp_path / "stripes", "stripes", caption="red stripes"))
    checks = str(pattern_images(tmp_path / "checks", "checks", caption="blue checks"))
    return {
        "lora": dict(FAST, dataset=stripes, steps=5),
        "dreambooth_lora": dict(FAST, dataset=checks, instance_prompt="a photo of sks dog", steps=5),
        "dreambooth": dict(NO_LORA, dataset=checks, instance_prompt="a photo of sks dog", steps=5),
        "textual_inversion": dict(NO_LORA, dataset=checks, token="<sks>", initializer="dog",
                                  template="a photo of {}", steps=5),
        "slider": dict(FAST, concept="age", target="a person", positive="an old person", negative="a young person",
                       denoise_steps=2, steps=5),
        "joint": dict(FAST, steps=5, adapters={"a": {"dataset": stripes}, "b": {"dataset": checks}}),
        "reward": dict(reward="brightness", prompts=["a cat", "a dog"], iterations=5, sample_batch_size=2,
                       batch_size=2, sample_steps=2, guidance=1.0, resolution=16, rank=2, validation_steps=1),
    }


def _train(method: str, values: dict, home: Path, resume: bool = False):
    trainer = TRAINERS.get(method)
    config = trainer.config_class.model_validate(values)
    return trainer().train(config, registry=Registry(home), output="out", resume=resume, progress=False)


def _adapters(home: Path) -> list[tuple[str, int]]:
    return sorted((r["name"], r["version"]) for r in Registry(home).list() if r["kind"] != "dataset")


BUILTIN_TRAINERS = ["lora", "dreambooth_lora", "dreambooth", "textual_inversion", "slider", "joint", "reward"]


def test_every_builtin_trainer_is_covered():
    builtin = {n for n in TRAINERS.names() if TRAINERS.get(n).__module__.startswith("loraforge.")}
    assert builtin == set(BUILTIN_TRAINERS)


@pytest.mark.parametrize("method", BUILTIN_TRAINERS)
def test_sigterm_saves_a_checkpoint_and_resume_continues_from_it(home, tmp_path, sigterm_after_step, method):
    values = _configs(tmp_path)[method]
    sigterm_after_step(2)
    with pytest.raises(Stopped) as stopped:
        _train(method, values, home)
    assert "stopped by SIGTERM after step 2 of 5 (checkpoint saved" in str(stopped.value)
    assert [p.name for p in (home / "runs").glob("*/step-*")] == ["step-00000002"]
    assert _adapters(home) == []  # nothing half-registered (dataset snapshots are kept, as in any run)

    sigterm_after_step(None)
    manifests = _train(method, values, home, resume=True)
    assert manifests and all(m.version == 1 for m in manifests)
    key = "resumed_from_iteration" if method == "reward" else "resumed_from_step"
    assert manifests[0].metrics[key] == 2
    assert not list((home / "runs").glob("*/step-*")), "a finished run leaves no checkpoints behind"


def test_a_stopped_and_resumed_reward_run_equals_an_uninterrupted_one(home, tmp_path, sigterm_after_step):
    values = dict(_configs(tmp_path)["reward"], steps=2)  # two optimiser steps per sampled batch
    [whole] = _train("reward", values, home)
    sigterm_after_step(3)  # mid-iteration: the run finishes iteration 2 (step 4), checkpoints there, stops
    trainer = TRAINERS.get("reward")
    config = trainer.config_class.model_validate(values)
    with pytest.raises(Stopped, match=r"after step 4 of 10 \(checkpoint saved"):
        trainer().train(config, registry=Registry(home), output="again", progress=False)
    sigterm_after_step(None)
    [again] = trainer().train(config, registry=Registry(home), output="again", resume=True, progress=False)
    assert again.metrics["resumed_from_iteration"] == 2
    for key in ("reward_mean_per_iteration", "loss_per_iteration", "kl_per_iteration"):
        assert again.metrics[key] == whole.metrics[key], key
    a, b = adapter_state(home, whole), adapter_state(home, again)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name


RECIPE = """\
name: two
base: builtin:tiny-sd
steps:
  first:
    train: {method: lora, dataset: ./data, steps: 6, resolution: 16, rank: 2, validation_steps: 1}
  second:
    train: {method: lora, dataset: ./data, steps: 2, resolution: 16, rank: 2, validation_steps: 1, seed: 1}
"""


def test_sigterm_stops_the_whole_apply_and_the_next_apply_resumes(home, tmp_path, sigterm_after_step):
    pattern_images(tmp_path / "data", "stripes", caption="red stripes")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(RECIPE)
    runner = CliRunner()
    sigterm_after_step(2)
    result = runner.invoke(cli, ["recipe", "apply", str(recipe)])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: stopped by SIGTERM in step 'first': ") and "\n" not in last
    assert "after step 2 of 6 (checkpoint saved" in last and "not started: second" in last
    assert "second (train): not started" in result.output and "second (train): running" not in result.output
    assert _adapters(home) == []
    assert [p.name for p in (home / "runs").glob("*/step-*")] == ["step-00000002"]

    sigterm_after_step(None)
    result = runner.invoke(cli, ["recipe", "apply", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "resumed from step 2 of 6" in result.output
    assert _adapters(home) == [("two-first", 1), ("two-second", 1)]


def test_sigterm_between_steps_starts_no_further_step(home, tmp_path, monkeypatch):
    import loraforge.recipes.apply as apply

    recipe = tmp_path / "three.yaml"
    recipe.write_text("name: three\nbase: builtin:tiny-sd\nsteps:\n"
                      "  a:\n    synthetic: {kind: lora, rank: 2, seed: 1}\n"
                      "  b:\n    synthetic: {kind: lora, rank: 2, seed: 2}\n"
                      "  c:\n    synthetic: {kind: lora, rank: 2, seed: 3}\n")
    real = apply._run_step

    def run_then_sigterm(plan, ps, *args):
        out = real(plan, ps, *args)
        if ps.id == "a":  # a SIGTERM while a non-training step runs: it finishes, nothing after it starts
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(apply, "_run_step", run_then_sigterm)
    result = CliRunner().invoke(cli, ["recipe", "apply", str(recipe)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: stopped by SIGTERM after step 'a' finished; not started: b, c; finished steps stay registered, "
        "apply again to continue")
    assert _adapters(home) == [("three-a", 1)]


STOPPER = """\
import os, signal, sys, time
from loraforge.stopping import sigterm_stops, stop_requested

with sigterm_stops():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.005)  # a dying daemon delivers its parent-death SIGTERM once per thread, milliseconds apart
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    print("one request:", stop_requested(), flush=True)
    time.sleep(float(sys.argv[1]))
    os.kill(os.getpid(), signal.SIGTERM)  # a second, later SIGTERM: stop at once
    time.sleep(0.2)
    print("still running", flush=True)
"""


def test_a_burst_of_sigterms_is_one_request_and_a_later_one_stops_at_once(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "stopper.py"
    script.write_text(STOPPER)
    done = subprocess.run([sys.executable, str(script), "1.5"], capture_output=True, text=True, timeout=60)
    assert done.stdout == "one request: True\n" and done.returncode == -signal.SIGTERM, (done.stdout, done.stderr)
