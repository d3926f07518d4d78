"""The `shapes` reward: the judge's probability of what the prompt (or `want`) asks, as `train reward` loads it."""

from __future__ import annotations

import pytest

from loraforge.errors import RewardError
from loraforge.rewards.base import load_reward
from loraforge.world.generator import generate, with_labels


def test_want_rewards_the_asked_colour_whatever_the_prompt_says():
    reward = load_reward("shapes", {"want": {"colour": "red"}})
    red = [generate(40 + i, 64, colour="red").image for i in range(6)]
    blue = [generate(40 + i, 64, colour="blue").image for i in range(6)]
    prompts = ["a circle"] * 6
    high, low = reward(red, prompts), reward(blue, prompts)
    assert min(high) > 0.8 and max(low) < 0.2, (high, low)
    assert (reward.name, reward.version) == ("shapes", "1")


def test_without_want_it_scores_the_prompt():
    reward = load_reward("shapes")
    sample = generate(7, 64, split="pretrain")
    other = "green" if sample.labels.colour != "green" else "red"
    right, wrong = reward([sample.image, with_labels(sample, colour=other).image], [sample.caption] * 2)
    assert right > 0.5 > wrong


@pytest.mark.parametrize("want, message", [
    ({"hue": "red"}, "shapes reward: unknown attribute 'hue' in want; use one of shape, colour"),
    ({"colour": "teal"}, "shapes reward: 'teal' is not a colour of the shapes world; use one of red"),
])
def test_a_bad_want_is_refused_in_one_line(want, message):
    with pytest.raises(RewardError) as err:
        load_reward("shapes", {"want": want})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
