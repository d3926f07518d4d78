"""The `shapes` reward: the shapes-world judge's probability that an image shows what is asked for.

Without options it asks for what each sampled prompt names (the `shapes` evaluator's score); with `want`
(e.g. `{"colour": "red"}`) it asks for those attribute values whatever the prompt says — the reward of a
fine-tune that should move one attribute ("make everything red") while the KL weight holds the rest.
"""

from __future__ import annotations

import math
from typing import Sequence

from loraforge.errors import RewardError
from loraforge.plugins import REWARDS

VERSION = "1"


@REWARDS.register("shapes", version=VERSION,
                  description="Shapes-world judge: P(image shows the prompt's attributes, or those of `want`).")
class ShapesReward:
    """`want` maps attributes (shape, colour, background, size, position, style) to the values rewarded;
    `aliases` maps extra prompt words (a DreamBooth token) to shapes-world words when scoring prompts."""

    name = "shapes"
    version = VERSION

    def __init__(self, want: dict[str, str] | None = None, aliases: dict[str, str] | None = None):
        from loraforge.evaluators.shapes import ShapesEvaluator
        from loraforge.world.vocabulary import ATTRIBUTES

        self.want = {str(k).lower(): str(v).lower() for k, v in (want or {}).items()}
        for attribute, value in self.want.items():
            if attribute not in ATTRIBUTES:
                raise RewardError(f"shapes reward: unknown attribute {attribute!r} in want; "
                                  f"use one of {', '.join(ATTRIBUTES)}")
            if value not in ATTRIBUTES[attribute]:
                raise RewardError(f"shapes reward: {value!r} is not a {attribute} of the shapes world; "
                                  f"use one of {', '.join(ATTRIBUTES[attribute])}")
        self.evaluator = ShapesEvaluator(aliases=aliases)

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        if not self.want:
            return self.evaluator(images, prompts)
        return [math.prod(probs[a][v] for a, v in self.want.items())
                for probs in self.evaluator.judge.probabilities(list(images))]
