"""Reward fine-tuning follows the reward: on builtin:tiny-sd the mean brightness rises when trained on the
brightness reward and falls when trained on its inverse (1 - brightness), with the real VAE decoder."""

from __future__ import annotations

import pytest

from loraforge.plugins import TRAINERS
from loraforge.registry.registry import Registry
from loraforge.train.trainers.reward import RewardConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(registry, output, options):
    config = RewardConfig(reward="brightness", reward_options=options, prompts=["a cat", "a dog"], iterations=5,
                          sample_batch_size=64, batch_size=64, sample_steps=4, guidance=1.0, resolution=16, rank=2,
                          target_modules=["conv_out"], learning_rate=0.1, kl_weight=0.0, seed=0, validation_steps=2)
    return TRAINERS.get("reward")().train(config, registry=registry, output=output, progress=False)[0]


@pytest.mark.slow
def test_mean_brightness_rises_for_the_reward_and_falls_for_its_inverse(home):
    registry = Registry(home)
    up = _train(registry, "up", {}).metrics["reward_mean_per_iteration"]
    down = _train(registry, "down", {"invert": True}).metrics["reward_mean_per_iteration"]
    # Same seed, same untrained policy: iteration 0 is the same batch, scored as b and 1 - b.
    assert up[0] == pytest.approx(1.0 - down[0], abs=1e-6)
    # Measured brightness (R): 0.469 0.471 0.436 0.508 0.550; 1 - brightness (inverse): 0.531 0.521 0.505 0.614 0.716.
    assert up[-1] > up[0] + 0.04, up
    assert down[-1] > down[0] + 0.1, down
    assert max(up[-2:]) > max(up[:2]) and max(down[-2:]) > max(down[:2])
