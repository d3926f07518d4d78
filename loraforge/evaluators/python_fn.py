"""User metrics given as `python:module:function`: a function (images, prompts) -> list[float], such as OCR or a
detector. The function is imported and versioned exactly as a `python:` reward is (rewards.python_fn)."""

from __future__ import annotations

from typing import Sequence

from loraforge.errors import ConfigError, RewardError
from loraforge.evaluators.base import check_scores
from loraforge.plugins import EVALUATORS


@EVALUATORS.register("python", version="1", description="A user function f(images, prompts) -> list[float], "
                                                        "given as python:module:function.")
class PythonFunctionEvaluator:
    """Calls `module.function(images, prompts)`; its version is the function's `version` attribute, else a
    digest of its source, so an edited function is recorded as another evaluator version."""

    def __init__(self, function: str):
        from loraforge.rewards.python_fn import PythonFunctionReward

        try:
            self.function = PythonFunctionReward(function)
        except RewardError as exc:
            raise ConfigError(f"metric python:{function}: {exc}") from None
        self.name = f"python:{function}"
        self.version = self.function.version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, self.function.fn(list(images), list(prompts)), len(images))
