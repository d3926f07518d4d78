"""The `clip_score` evaluator: text–image agreement, scale · cos(CLIP_image(I), CLIP_text(prompt)).

It is the `clip_score` reward's computation (rewards.clip_score), so a reward fine-tune and its evaluation
measure the same number.
"""

from __future__ import annotations

from typing import Optional, Sequence

from loraforge.plugins import EVALUATORS

VERSION = "1"


@EVALUATORS.register("clip_score", version=VERSION, reference_url="https://arxiv.org/abs/2104.08718",
                     description="CLIP text-image cosine similarity of each image with its prompt (times scale).")
class ClipScoreEvaluator:
    """`model`: a CLIP model folder (a CLIPModel with its processor) or a Hub id in the local cache; `scale`
    multiplies the cosine (CLIPScore papers report 100 · cos)."""

    def __init__(self, model: Optional[str] = None, scale: float = 1.0, device: Optional[str] = None,
                 batch_size: int = 16):
        from loraforge.rewards.clip_score import ClipScoreReward

        options = {"scale": scale, "device": device, "batch_size": batch_size}
        self.clip = ClipScoreReward(**({"model": model} if model else {}), **options)
        self.version = self.clip.version  # another CLIP model is another evaluator version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return self.clip(images, prompts)
