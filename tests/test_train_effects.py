"""Trainer effects a user notices: resume after a real SIGKILL is exact, DreamBooth binds its change to the
instance prompt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraforge.registry import Registry
from tests.cli_helpers import link_builtins
from tests.process_helpers import sigterm_at
from test_train import RES, adapter_state, pattern_images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- resume after a real kill ------------------------------------------------------------------

def _train_cmd(home: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraforge", "--home", str(home), "train", "lora", "--name", "x",
            "--dataset", str(data), "--steps", "30", "--checkpoint-every", "3", "--resolution", str(RES),
            "--rank", "4", "--alpha", "8", "--learning-rate", "1e-2", "--batch-size", "2",
            "--validation-steps", "1", "--validation-prompts", "red stripes", "--json", *extra]


def _env(home: Path) -> dict:
    # One thread in every process: the same reduction order, so CPU results are bit-identical.
    return {**os.environ, "LORAFORGE_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _link_builtins(home: Path, tiny_sd_path: Path) -> Path:
    return link_builtins(home, {"tiny-sd": tiny_sd_path})


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_sd_path):
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    whole_home = _link_builtins(tmp_path / "whole", tiny_sd_path)
    done = subprocess.run(_train_cmd(whole_home, data), env=_env(whole_home), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    home = _link_builtins(tmp_path / "killed", tiny_sd_path)
    proc = subprocess.Popen(_train_cmd(home, data), env=_env(home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not list((home / "runs").glob("*/step-*/state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (home / "runs").glob("*/step-*"))
    assert checkpoints and checkpoints[-1] != "step-00000030", checkpoints
    assert Registry(home).list(name="x") == []  # nothing registered by the killed run

    resumed = subprocess.run(_train_cmd(home, data, "--resume"), env=_env(home), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    registry = Registry(home)
    assert [row["version"] for row in registry.list(name="x")] == [1]  # one version, not one per attempt
    resumed_m = registry.resolve("x:1")
    assert resumed_m.metrics["resumed_from_step"] >= 3
    assert not list((home / "runs").glob("*/step-*"))  # the finished run cleans its checkpoints

    whole = Registry(whole_home).resolve("x:1")
    a, b = adapter_state(whole_home, whole), adapter_state(home, resumed_m)
    assert sorted(a) == sorted(b) and len(a) > 0
    for name in a:
        assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name
    assert resumed_m.metrics["loss_last"] == whole.metrics["loss_last"]



# ---- dreambooth: the change is bound to the instance prompt ------------------------------------

def test_dreambooth_changes_the_instance_prompt_more_than_an_unrelated_one(home, tmp_path, tiny_sd_path):
    from test_train import Model, train

    data = pattern_images(tmp_path / "subject", "checks")
    [m] = train(home, "dreambooth_lora", "sks", dataset=str(data), instance_prompt="a photo of sks dog", steps=40,
                target_modules=["attn2.to_k", "attn2.to_v"], validation_prompts=["sks"])
    model = Model(tiny_sd_path)
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(8, 4, RES // 2, RES // 2, generator=g), torch.randint(50, 950, (8,), generator=g)
    prompts = ("a photo of sks dog", "a red house")
    base = {p: model.eps(x, t, p) for p in prompts}
    model.fuse(adapter_state(home, m))
    moved = {p: float((model.eps(x, t, p) - base[p]).norm()) for p in prompts}
    model.fuse(None)
    # Same noise and timesteps; measured 35.1 vs 25.0 (ratio 1.40).
    assert moved["a photo of sks dog"] > 1.25 * moved["a red house"], moved


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_finishes(tmp_path, tiny_sd_path):
    """The daemon stops a job with SIGTERM: training saves a checkpoint at once and exits 1; a resumed
    run continues from that step instead of losing everything since the last periodic checkpoint."""
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    home = _link_builtins(tmp_path / "h", tiny_sd_path)
    cmd = _train_cmd(home, data)
    cmd[cmd.index("--steps") + 1], cmd[cmd.index("--checkpoint-every") + 1] = "200", "1000"
    cmd.remove("--json")  # plain progress lines on stderr tell the test when training is under way
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = sigterm_at(proc, "step 20/200")
    assert proc.returncode == 1
    assert "stopped by SIGTERM after step" in err and "checkpoint saved" in err
    stopped_at = int(err.split("stopped by SIGTERM after step ")[1].split()[0])
    assert 20 <= stopped_at < 200
    assert [p.name for p in (home / "runs").glob("*/step-*")] == [f"step-{stopped_at:08d}"]
    assert Registry(home).list(name="x") == []

    cmd.append("--resume")
    resumed = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = Registry(home).resolve("x")
    assert manifest.version == 1 and manifest.metrics["resumed_from_step"] == stopped_at
