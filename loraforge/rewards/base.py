"""The Reward protocol and the factory that builds a reward from a spec string and options."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from loraforge.errors import PluginError, RewardError
from loraforge.evaluators.base import check_scores as check_finite_scores
from loraforge.hashing import sha256_bytes


@runtime_checkable
class Reward(Protocol):
    """Scores images (one float each, higher is better); `name` and `version` go into provenance."""

    name: str
    version: str

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        ...


class FunctionReward:
    """A plain `fn(images, prompts) -> list[float]` (an entry-point plugin) as a Reward."""

    def __init__(self, fn, name: str, version: str):
        self.fn, self.name, self.version = fn, name, version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, self.fn(list(images), list(prompts)), len(images))


def check_scores(name: str, scores, n: int) -> list[float]:
    """`scores` as n finite floats, or a RewardError naming the reward (the evaluators' check)."""
    return check_finite_scores(name, scores, n, noun="reward", error=RewardError)


def image_digest(image) -> str:
    """sha256 of an image's mode, size and pixels (independent of how it would be encoded)."""
    header = f"{image.mode}:{image.width}x{image.height}:".encode()
    return sha256_bytes(header + image.tobytes())


def load_reward(spec: str, options: dict[str, Any] | None = None, *, registry=None) -> Reward:
    """A reward from `spec` — a registered name (`brightness`, `gpt_illusion`, `clip_score`, …) or
    `python:module:function` — configured with `options`. Rewards that cache take the `registry`.

    Construction checks everything that can be checked up front (API keys, model paths), so a bad
    reward fails before any sampling starts.
    """
    from loraforge.plugins import REWARDS

    options = dict(options or {})
    name = spec.strip()
    if name.startswith("python:"):
        options["function"] = name[len("python:"):]
        name = "python"
    try:
        info = REWARDS.info(name)
    except PluginError as exc:
        raise RewardError(f"{exc} (or python:module:function)") from None
    reward = REWARDS.construct(info, options, label=f"reward {name!r}", error=RewardError,
                               wrap_function=lambda fn, version: FunctionReward(fn, name, version), registry=registry)
    reward.name = getattr(reward, "name", None) or name
    return reward


def reward_metrics(reward: Reward) -> dict[str, Any]:
    """Run statistics a reward keeps (requests, tokens, cost …), empty when it keeps none."""
    metrics = getattr(reward, "metrics", None)
    return dict(metrics()) if callable(metrics) else {}
