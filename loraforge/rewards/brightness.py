"""A deterministic synthetic reward: the mean brightness of the image (for tests and demos)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from loraforge.plugins import REWARDS

VERSION = "1"


@REWARDS.register("brightness", version=VERSION, description="Mean image brightness in [0, 1] (synthetic, deterministic).")
class BrightnessReward:
    """Mean of the greyscale (L) pixel values divided by 255; `invert` rewards darkness instead."""

    name = "brightness"
    version = VERSION

    def __init__(self, invert: bool = False):
        self.invert = bool(invert)

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        scores = [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]
        return [1.0 - s for s in scores] if self.invert else scores
