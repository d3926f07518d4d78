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
