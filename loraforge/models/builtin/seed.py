"""The seed every builtin weight derives from: each component reseeds with its own offset."""

from __future__ import annotations

import torch

BUILTIN_SEED = 20240607


def seeded(offset: int) -> None:
    torch.manual_seed(BUILTIN_SEED + offset)
