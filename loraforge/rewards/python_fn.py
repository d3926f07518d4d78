"""User rewards given as `python:module:function`, a function (images, prompts) -> list[float]."""

from __future__ import annotations

import importlib
import inspect
from typing import Sequence

from loraforge.errors import RewardError
from loraforge.hashing import sha256_bytes
from loraforge.plugins import REWARDS
from loraforge.rewards.base import check_scores


@REWARDS.register("python", version="1", description="A user function, given as python:module:function.")
class PythonFunctionReward:
    """Calls `module.function(images, prompts)`. Its version is the function's `version` attribute if it
    has one, else a digest of its source, so editing the function changes the provenance."""

    def __init__(self, function: str):
        module_name, _, attr = function.partition(":")
        if not module_name or not attr:
            raise RewardError(f"bad python reward {function!r}: use python:module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardError(f"cannot import module {module_name!r} of python reward {function!r}: {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"module {module_name!r} has no function {attr!r} (python reward {function!r})")
        self.fn = fn
        self.name = f"python:{function}"
        version = getattr(fn, "version", None)
        if version is None:
            try:
                version = "src-" + sha256_bytes(inspect.getsource(fn).encode())[:12]
            except (OSError, TypeError):
                version = "1"
        self.version = str(version)

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, self.fn(list(images), list(prompts)), len(images))
