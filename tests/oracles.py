"""What tests compare against other programs' output with: the messages a loader logs, a safetensors file's
tensor entries and data, relative error."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def loader_messages():
    """Collect what diffusers, PEFT and transformers log or warn while a file loads."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    lines += [str(w.message) for w in caught]


def entries_and_data(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's tensor entries (names, dtypes, shapes, offsets) and data section, header metadata aside."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + size])
    header.pop("__metadata__", None)
    return header, raw[8 + size:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def flux_transformer_inputs(transformer, seed: int = 9, side: int = 4, text_tokens: int = 8) -> dict:
    """Fixed keyword inputs of one forward of a diffusers FluxTransformer2DModel: side×side packed image tokens
    with their grid position ids, `text_tokens` T5 tokens, a pooled vector, σ 0.6 and guidance 3.5 (widths from
    the transformer's config), so tests compare `transformer(**inputs)[0]` of two models on the same draws."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    return dict(hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.6]), img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3),
                guidance=torch.tensor([3.5]), return_dict=False)
