"""Reward fine-tuning stays finite on SD1 bases other than the builtin one: stock scheduler configs whose last
DDIM step is deterministic (ᾱ_prev = 1, or ᾱ_prev = ᾱ_t), other UNet shapes, v-prediction, several seeds."""

from __future__ import annotations

import math
import random
import textwrap

import pytest
import torch

from loraforge.models.builtin import build_tiny_components
from loraforge.plugins import TRAINERS
from loraforge.registry.registry import Registry
from loraforge.registry.resolve import load_adapter
from loraforge.train.trainers.reward import RewardConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def brightness_module(tmp_path, monkeypatch):
    """A user reward given as python:module:function, as the issue reported it."""
    (tmp_path / "user_bright.py").write_text(textwrap.dedent("""
        import numpy as np

        def score(images, prompts):
            return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:user_bright:score"


def random_sd1_base(folder, scheduler: dict, seed: int) -> dict:
    """A diffusers SD1 folder: the builtin text encoder and VAE, a freshly initialised UNet of a shape drawn from
    `seed`, and a DDIM scheduler with the training schedule of `scheduler`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    rng = random.Random(seed)
    parts = build_tiny_components("tiny-sd")
    width = rng.choice([16, 32])
    torch.manual_seed(seed)
    unet = dict(block_out_channels=(width, 2 * width), layers_per_block=rng.choice([1, 2]),
                attention_head_dim=rng.choice([2, 4, 8]), norm_num_groups=rng.choice([4, 8, 16]),
                use_linear_projection=rng.choice([True, False]))
    parts["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, **unet)
    parts["scheduler"] = DDIMScheduler(beta_start=0.00085, beta_end=0.012, clip_sample=False, **scheduler)
    StableDiffusionPipeline(**parts).save_pretrained(folder)
    return {**unet, **scheduler}


SCHEDULERS = [  # (what makes it hard, DDIM config, seed of the UNet shape and of the run)
    ("diffusers' defaults: the last step lands on alpha_bar = 1 (zero variance)", {}, 0),
    ("linear betas onto alpha_bar = 1", dict(beta_schedule="linear"), 1),
    ("linspace spacing ends at t = 0, v-prediction",
     dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace", prediction_type="v_prediction"), 2),
    ("trailing spacing onto alpha_bar = 1", dict(timestep_spacing="trailing", beta_schedule="scaled_linear"), 3),
    ("SD1.5's schedule (a small but non-zero last variance)",
     dict(set_alpha_to_one=False, steps_offset=1, beta_schedule="scaled_linear"), 4),
]


@pytest.mark.parametrize("why, scheduler, seed", SCHEDULERS, ids=[f"seed{c[2]}" for c in SCHEDULERS])
def test_reward_training_on_other_sd1_bases_stays_finite(home, tmp_path, brightness_module, why, scheduler, seed):
    folder = tmp_path / "base"
    drawn = random_sd1_base(folder, scheduler, seed)
    registry = Registry(home)
    config = RewardConfig(base=str(folder), reward=brightness_module, prompts=["a cat", "a dog"], iterations=3,
                          steps=2, sample_batch_size=4, batch_size=4, sample_steps=3, resolution=32, seed=seed,
                          validation_steps=2)
    manifest = TRAINERS.get("reward")().train(config, registry=registry, output="tuned", progress=False)[0]
    m = manifest.metrics
    for key in ("loss_per_iteration", "kl_per_iteration", "reward_mean_per_iteration"):
        assert all(math.isfinite(v) for v in m[key]), (why, key, m[key], drawn)
    assert math.isfinite(m["eps_drift"]) and m["eps_drift"] > 0, (why, drawn)  # it trained, and stayed finite
    state, _ = load_adapter(registry, "tuned")
    assert all(torch.isfinite(t).all() for mod in state.values() for t in (mod.down, mod.up)), (why, drawn)


def test_the_shared_loop_refuses_a_non_finite_loss_before_it_steps():
    from loraforge.errors import TrainingError
    from loraforge.train.loop import run_loop

    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    def step_fn(step: int, micro: int):
        seen.append(weight.detach().clone())
        scale = float("nan") if step == 2 else 1.0
        return (weight * scale).pow(2).sum()

    with pytest.raises(TrainingError, match=r"^t: training diverged at step 3 of 5 \(loss nan.*lower learning_rate"):
        run_loop(title="t", params={"w": weight}, step_fn=step_fn, steps=5, learning_rate=0.1, progress=False)
    assert torch.equal(weight.detach(), seen[-1]) and torch.isfinite(weight).all()  # the NaN step was not taken
