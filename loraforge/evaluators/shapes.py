"""The `shapes` evaluator: the shapes-world judge reads an image, and the prompt says what it should show.

The prompt is parsed into the attributes it names (`world.captions.parse_prompt`); the score is the
product of the judge's probabilities for those values — the chance that everything asked for is there —
so one wrong attribute (a blue circle for "a red circle") scores near zero. Attributes the prompt does not
name are not scored; their probabilities are still reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loraforge.errors import ConfigError
from loraforge.plugins import EVALUATORS
from loraforge.world.captions import parse_prompt
from loraforge.world.judge import PROVENANCE_PATH, WEIGHTS_PATH, load_judge
from loraforge.world.vocabulary import ATTRIBUTES, SHAPES

VERSION = "1"  # bump with the judge's weights


@dataclass(frozen=True)
class ShapesScore:
    """One image against one prompt: what the prompt asks, the judge's probability of each asked value,
    what the judge reads (its most probable value per attribute) and the score."""

    score: float
    expected: dict[str, str]
    probabilities: dict[str, float]
    predicted: dict[str, str]
    distribution: dict[str, dict[str, float]]


@EVALUATORS.register("shapes", version=VERSION,
                     description="Shapes-world judge: P(image shows every attribute the prompt names).")
class ShapesEvaluator:
    """Scores images of the shapes world against prompts in its words; `aliases` maps extra prompt words
    (a DreamBooth token) to shapes-world words, `attributes` limits the score to those attributes (["shape"]:
    does it show the asked shape, whatever its colour or place — what a personalised concept is judged on),
    `weights` names another judge's safetensors file (its provenance JSON beside it, same stem)."""

    name = "shapes"
    version = VERSION

    def __init__(self, aliases: dict[str, str] | None = None, weights: str | None = None,
                 attributes: Sequence[str] | None = None):
        self.aliases = {str(k).lower(): str(v).lower() for k, v in (aliases or {}).items()}
        if isinstance(attributes, str):
            attributes = [attributes]
        unknown = sorted(set(attributes or ()) - set(ATTRIBUTES))
        if unknown or (attributes is not None and not attributes):
            raise ConfigError(f"attributes {', '.join(unknown) or '[]'} of the shapes evaluator: choose among "
                              f"{', '.join(ATTRIBUTES)}")
        self.attributes = tuple(attributes) if attributes else None
        known = {v for values in ATTRIBUTES.values() for v in values} | {"background"}
        bad = sorted(v for v in self.aliases.values() if v not in known)
        if bad:
            raise ConfigError(f"alias target(s) {', '.join(bad)} of the shapes evaluator are not shapes-world words: "
                              f"use a shape ({', '.join(SHAPES)}), colour, background, size, position or style")
        path = Path(weights) if weights else WEIGHTS_PATH
        self.judge = load_judge(path, path.with_suffix(".json") if weights else PROVENANCE_PATH)

    def expected(self, prompt: str) -> dict[str, str]:
        found = parse_prompt(prompt, self.aliases)
        if self.attributes is not None:
            found = {name: value for name, value in found.items() if name in self.attributes}
            if not found:
                raise ConfigError(f"prompt {prompt!r} names none of the scored attributes "
                                  f"({', '.join(self.attributes)}): name one in the prompt, or give aliases")
        if not found:
            raise ConfigError(f"prompt {prompt!r} names no shapes-world attribute (a shape, colour, background, "
                              "size, position or style): score it with another evaluator, or give aliases")
        return found

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt the judge cannot score before any image is drawn for it."""
        for prompt in prompts:
            self.expected(prompt)

    def evaluate(self, images: Sequence, prompts: Sequence[str]) -> list[ShapesScore]:
        if len(images) != len(prompts):
            raise ConfigError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")
        expected = [self.expected(p) for p in prompts]
        out = []
        for want, probs in zip(expected, self.judge.probabilities(list(images))):
            asked = {name: probs[name][value] for name, value in want.items()}
            out.append(ShapesScore(score=math.prod(asked.values()), expected=want, probabilities=asked,
                                   predicted={name: max(p, key=p.get) for name, p in probs.items()},
                                   distribution=probs))
        return out

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return [s.score for s in self.evaluate(images, prompts)]
