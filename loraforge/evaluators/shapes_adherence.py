"""Prompt adherence of a text-to-image pipeline in the shapes world, measured with the judge.

Each sample is one generator seed: its labels are drawn in a split (`pretrain`: combinations the model was
trained on; `holdout`: held-out shapes, combinations or styles), the prompt is their caption, and the
pipeline draws it from a generator seeded with the same seed. The judge reads every image; an attribute
counts as right when the judge's most probable value is the one the caption asked for.
"""

from __future__ import annotations

from typing import Sequence

import torch

from loraforge.world.captions import caption
from loraforge.world.generator import draw_labels
from loraforge.world.vocabulary import ATTRIBUTES

ADHERENCE_SEEDS = range(2 * 10**9, 2 * 10**9 + 64)


@torch.no_grad()
def draw(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, guidance: float = 4.0,
         batch: int = 16) -> list:
    """One 64 px image per (prompt, seed), each from its own seeded generator."""
    images = []
    for begin in range(0, len(prompts), batch):
        chunk = slice(begin, begin + batch)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        images += pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance, height=64,
                       width=64, generator=generators).images
    return images


def adherence(pipe, judge, seeds: Sequence[int] = ADHERENCE_SEEDS, split: str = "pretrain", steps: int = 20,
              guidance: float = 4.0) -> dict:
    """The fraction of images whose judged value is the asked one, per attribute and for all at once, with
    the prompts, what the judge read, and the images."""
    seeds = list(seeds)
    labels = [draw_labels(s, split=split) for s in seeds]
    prompts = [caption(lab) for lab in labels]
    images = draw(pipe, prompts, seeds, steps, guidance)
    read = judge.labels(images)
    right = dict.fromkeys([*ATTRIBUTES, "all"], 0)
    for lab, guess in zip(labels, read):
        hits = [guess[name] == getattr(lab, name) for name in ATTRIBUTES]
        for name, hit in zip(ATTRIBUTES, hits):
            right[name] += hit
        right["all"] += all(hits)
    return {"split": split, "samples": len(seeds), "steps": steps, "guidance": guidance,
            "accuracy": {name: round(count / len(seeds), 4) for name, count in right.items()},
            "prompts": prompts, "read": read, "images": images}
