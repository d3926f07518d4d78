"""Training on several processes (gloo on CPU): two ranks compute what one process computes, a killed run
resumes, and what several processes cannot honour is refused in one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from loraforge.registry import Registry
from test_train import RES, adapter_state, cli_run, pattern_images, train
from test_train_effects import _env, _link_builtins
from tests.process_helpers import alive, children_of, sigterm_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A global batch of 4 split 2 + 2, accumulated twice, under a warm-up and cosine schedule.
RUN = dict(steps=4, batch_size=4, gradient_accumulation=2, lr_scheduler="cosine", lr_warmup_steps=1,
           validation_prompts=["red stripes"], validation_steps=1, target_modules=["to_k", "to_v"])


def test_two_processes_train_the_adapter_one_process_trains(home, tmp_path):
    data = pattern_images(tmp_path / "d", "stripes", n=6, caption="red stripes")
    [one] = train(home, "lora", "one", dataset=str(data), processes=1, **RUN)
    [two] = train(home, "lora", "two", dataset=str(data), processes=2, **RUN)
    registry = Registry(home)
    # Rank 0 alone registered: one version of the adapter, and the dataset snapshot once for both runs.
    assert [r["version"] for r in registry.list(name="two")] == [1]
    assert len(registry.list(kind="dataset")) == 1
    assert two.provenance.params["processes"] == 2
    a, b = adapter_state(home, one), adapter_state(home, two)
    assert sorted(a) == sorted(b) and a
    diffs = torch.cat([(x[n].down - y[n].down).abs().flatten() for x, y in [(a, b)] for n in a]
                      + [(a[n].up - b[n].up).abs().flatten() for n in a])
    # The mean of two half-batch gradients vs one whole-batch gradient differ by float rounding; AdamW's first
    # steps (g / sqrt(v)) blow that up only where a gradient is ~0. Measured: mean 6e-8, worst 2e-5 (0.2% of
    # the entries above 1e-6), on up weights of size 3e-2; the same 1-process run twice: 0. Summing the ranks'
    # gradients instead (measured): mean 1e-5, worst 1.4e-2.
    assert float(diffs.mean()) < 1e-6 and float(diffs.max()) < 2e-4, (float(diffs.mean()), float(diffs.max()))
    assert any(float((a[n].up).abs().max()) > 1e-3 for n in a)  # the adapter did train
    assert two.metrics["loss_first"] == pytest.approx(one.metrics["loss_first"], rel=1e-6)  # measured: equal
    assert two.metrics["loss_last"] == pytest.approx(one.metrics["loss_last"], rel=1e-6)  # measured: 5e-8
    # AdamW's step hides most of a gradient's scale; the gradient norm shows it (a sum over the ranks doubles it).
    assert two.metrics["grad_norm_last"] == pytest.approx(one.metrics["grad_norm_last"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the ranks")
def test_killed_two_process_run_resumes_and_registers_once(tmp_path, tiny_sd_path):
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    home = _link_builtins(tmp_path / "h", tiny_sd_path)
    cmd = [sys.executable, "-m", "loraforge", "--home", str(home), "train", "lora", "--name", "x",
           "--dataset", str(data), "--steps", "12", "--checkpoint-every", "2", "--resolution", str(RES),
           "--rank", "4", "--learning-rate", "1e-2", "--batch-size", "2", "--processes", "2",
           "--target-modules", "to_k", "--validation-steps", "1", "--validation-prompts", "red stripes", "--json"]
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list((home / "runs").glob("*/step-*/state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        ranks = children_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(ranks) == 2, ranks
    deadline = time.monotonic() + 10
    while any(alive(r) for r in ranks):  # the ranks die with the launching process
        assert time.monotonic() < deadline, "a rank outlived the killed run"
        time.sleep(0.05)
    checkpoints = sorted(p.name for p in (home / "runs").glob("*/step-*"))
    assert checkpoints and checkpoints[-1] != "step-00000012", checkpoints
    assert Registry(home).list(name="x") == []

    resumed = subprocess.run([*cmd, "--resume"], env=_env(home), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    registry = Registry(home)
    assert [row["version"] for row in registry.list(name="x")] == [1]
    m = registry.resolve("x:1")
    assert m.metrics["resumed_from_step"] >= 2 and m.metrics["steps"] == 12
    assert not list((home / "runs").glob("*/step-*"))
    # ... and it trained what one uninterrupted process trains. Measured over these 12 steps (up weights up to
    # 0.12): mean 1.0e-6, worst 1.5e-4, the worst entry the same as an uninterrupted 2-process run's (mean
    # 7.8e-7): rounding that AdamW grows step by step, nothing lost in the resume.
    [whole] = train(home, "lora", "whole", dataset=str(data), steps=12, rank=4, alpha=None, batch_size=2,
                    target_modules=["to_k"], validation_steps=1, validation_prompts=["red stripes"])
    a, b = adapter_state(home, whole), adapter_state(home, m)
    assert sorted(a) == sorted(b) and a
    diffs = torch.cat([(a[n].up - b[n].up).abs().flatten() for n in a] + [(a[n].down - b[n].down).abs().flatten()
                                                                          for n in a])
    assert float(diffs.mean()) < 5e-6 and float(diffs.max()) < 1e-3, (float(diffs.mean()), float(diffs.max()))


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_a_checkpoint(tmp_path, tiny_sd_path):
    """The daemon stops a job with SIGTERM to the launching process: the ranks stop at the same step, rank 0
    checkpoints there, and the command fails with the run's own one-line message."""
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    home = _link_builtins(tmp_path / "h", tiny_sd_path)
    cmd = [sys.executable, "-m", "loraforge", "--home", str(home), "train", "lora", "--name", "x",
           "--dataset", str(data), "--steps", "200", "--resolution", str(RES), "--rank", "4", "--batch-size", "2",
           "--processes", "2", "--target-modules", "to_k", "--validation-steps", "1"]
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = sigterm_at(proc, "step 20/200")
    assert proc.returncode == 1
    [message] = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert "stopped by SIGTERM after step" in message and "checkpoint saved" in message, err
    stopped_at = int(message.split("after step ")[1].split()[0])
    assert [p.name for p in (home / "runs").glob("*/step-*")] == [f"step-{stopped_at:08d}"]
    assert Registry(home).list(name="x") == []


def test_recipe_train_step_on_two_processes_with_prior_preservation(home, tmp_path):
    """`processes: 2` in a recipe: DreamBooth-LoRA with class images generated by rank 0 (the other rank uses
    them); one adapter version, each dataset snapshot once; a second apply skips the step."""
    from cli_helpers import run_cli

    data = pattern_images(tmp_path / "d", "checks")
    recipe = tmp_path / "db.yaml"
    recipe.write_text(f"""\
name: db
base: builtin:tiny-sd
steps:
  subject:
    train:
      method: dreambooth_lora
      dataset: {data}
      instance_prompt: a photo of sks dog
      prior_preservation: true
      class_prompt: a photo of dog
      num_class_images: 2
      class_generation_steps: 1
      processes: 2
      batch_size: 2
      steps: 2
      resolution: {RES}
      rank: 2
      target_modules: [to_k]
      validation_steps: 1
""")
    run_cli(home, "recipe", "apply", str(recipe))
    registry = Registry(home)
    [row] = registry.list(name="db-subject")
    m = registry.resolve("db-subject:1")
    assert m.provenance.params["processes"] == 2 and m.metrics["steps"] == 2
    assert len(registry.list(kind="dataset")) == 2  # the instance images and the class images, once each
    assert "up to date" in run_cli(home, "recipe", "apply", str(recipe)).output
    assert len(registry.list(name="db-subject")) == 1


@pytest.mark.parametrize("args, message", [
    (["lora", "--batch-size", "3", "--processes", "2"],
     "Error: batch_size 3 does not split over 2 processes; use a batch_size that is a multiple of 2"),
    (["textual_inversion", "--token", "<s>", "--initializer", "star", "--processes", "2"],
     "Error: trainer textual_inversion does not train on several processes (processes 2)"),
])
def test_what_several_processes_cannot_honour_is_refused_in_one_line(home, tmp_path, args, message):
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    result = cli_run(home, "train", args[0], "--name", "x", "--dataset", str(data), *args[1:])
    assert result.exit_code == 1
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert Registry(home).list() == []


def test_a_plugin_trainer_that_does_not_say_it_takes_processes_is_refused(home, tmp_path):
    import recipe_fake_trainer  # noqa: F401  (registers recipe_fake, a trainer outside SessionTrainer)

    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    result = cli_run(home, "train", "recipe_fake", "--name", "x", "--dataset", str(data), "--processes", "2")
    assert result.exit_code == 1
    assert result.output == ("Error: trainer recipe_fake does not train on several processes (processes 2); "
                             "use processes 1, or the lora or dreambooth_lora trainer\n")
    assert Registry(home).list() == []


def test_a_process_that_used_cuda_is_refused_before_forking(home, tmp_path, monkeypatch):
    """CUDA does not survive the launcher's fork: say so in one line instead of failing in every rank."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    result = cli_run(home, "train", "lora", "--name", "x", "--dataset", str(data), "--batch-size", "2",
                     "--processes", "2")
    assert result.exit_code == 1
    assert result.output.startswith("Error: processes 2 must be launched from a process that has not used the GPU")
    assert result.output.count("\n") == 1 and "--processes 2" in result.output
    assert Registry(home).list() == []


def test_a_flux_lora_trains_on_two_processes_from_a_home_without_the_builtin(tmp_path):
    """The base is built before the ranks start: built inside a rank, transformers would save its text encoders
    on rank 0 only and rank 1 could install a builtin without them (seen with tiny-flux on a fresh home)."""
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    home = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "loraforge", "--home", str(home), "train", "lora", "--base", "builtin:tiny-flux",
           "--name", "fx", "--dataset", str(data), "--steps", "2", "--resolution", "32", "--rank", "2",
           "--batch-size", "2", "--processes", "2", "--validation-steps", "1"]
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = Registry(home).resolve("fx:1")
    assert m.base.family == "flux" and m.metrics["steps"] == 2
    assert any((home / "models" / "builtin" / "tiny-flux" / "text_encoder").glob("*.safetensors"))


def test_a_builtin_whose_model_was_not_saved_is_not_installed(tmp_path, monkeypatch):
    """As rank 1 of a process group sees it: transformers declines to save, and the build is refused, not
    installed without its text encoders."""
    from transformers.distributed.mixin import DistributedMixin

    from loraforge.models.builtin import ensure_builtin

    monkeypatch.setattr(DistributedMixin, "should_save_on_this_rank", lambda self, is_main_process: False)
    with pytest.raises(RuntimeError, match="text_encoder .CLIPTextModel. was not saved"):
        ensure_builtin("tiny-sd", tmp_path)
    assert not (tmp_path / "models" / "builtin" / "tiny-sd").exists()
