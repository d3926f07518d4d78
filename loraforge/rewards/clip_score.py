"""CLIP image-text similarity as a reward, with a configurable CLIP model (a local folder offline).

The computation is the `clip_score` evaluator's (evaluators.clip_score), so what a reward fine-tune raises is
what `loraforge eval --metric clip_score` measures.
"""

from __future__ import annotations

from typing import Sequence

from loraforge.errors import RewardError
from loraforge.evaluators.clip_score import DEFAULT_MODEL, Clip, load_clip, text_image_cosines
from loraforge.plugins import REWARDS

VERSION = "1"


@REWARDS.register("clip_score", version=VERSION, reference_url="https://arxiv.org/abs/2104.08718",
                  description="CLIP image-text cosine similarity (times scale) with a configurable CLIP model.")
class ClipScoreReward:
    """scale · cos(CLIP_image(I), CLIP_text(prompt)); `model` is a Hub id (cached locally) or a folder."""

    name = "clip_score"

    def __init__(self, model: str = DEFAULT_MODEL, scale: float = 1.0, device: str | None = None,
                 batch_size: int = 16):
        self.model, self.processor, self.device = load_clip(model, device, error=RewardError)
        self.model_id, self.scale, self.batch_size = model, float(scale), int(batch_size)
        self.version = f"{VERSION}:{model}"  # another CLIP model is another reward

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        cosines = text_image_cosines(Clip(self.model, self.processor, self.device), images, prompts, self.batch_size)
        return [self.scale * c for c in cosines]
