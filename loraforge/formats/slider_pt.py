"""Concept Sliders `.pt` files: kohya-keyed LoRA weights in a torch pickle.

A pickle can run code when it is loaded, so these files are only ever opened with
`torch.load(..., weights_only=True)`; anything that is not tensors and plain containers is refused.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from loraforge.errors import FormatError, UnsafePickleError
from loraforge.formats.kohya import kohya_to_lora, lora_to_kohya
from loraforge.formats.lora import LoraState


def load_slider_pt(path: Path) -> dict[str, Tensor]:
    """The flat {key: tensor} dict of a slider `.pt` file, loaded without running any pickled code."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"refusing to unpickle {path}: it contains objects other than tensors ({_refusal_reason(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path} is not a readable torch file: {first}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise FormatError(f"{path} does not hold a flat dict of named tensors")
    return dict(obj)


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _refusal_reason(error: Exception) -> str:
    """The line of torch's weights_only error that says what was refused, without its advice to
    retry with weights_only=False."""
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(_BOILERPLATE):
            return line.rstrip(".")
    return "torch's weights-only loader refused it"


def read_slider_pt(path: Path, module_names: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    return kohya_to_lora(load_slider_pt(path), module_names)


def write_slider_pt(state: LoraState, path: Path) -> Path:
    path = Path(path)
    torch.save(lora_to_kohya(state), path)
    return path
