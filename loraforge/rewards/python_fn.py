"""User rewards given as `python:module:function`, a function (images, prompts) -> list[float]."""

from __future__ import annotations

from typing import Sequence

from loraforge.errors import RewardError
from loraforge.evaluators.python_fn import import_function
from loraforge.plugins import REWARDS
from loraforge.rewards.base import check_scores


@REWARDS.register("python", version="1", description="A user function, given as python:module:function.")
class PythonFunctionReward:
    """Calls `module.function(images, prompts)`. Its version is the function's `version` attribute if it
    has one, else a digest of its source, so editing the function changes the provenance."""

    def __init__(self, function: str):
        self.fn, self.version = import_function(function, noun="reward", error=RewardError)
        self.name = f"python:{function}"

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, self.fn(list(images), list(prompts)), len(images))
