"""Concept Sliders `.pt` files: kohya-keyed LoRA weights in a torch pickle.

A pickle can run code when it is loaded, so these files are only ever opened with
`torch.load(..., weights_only=True)`; anything that is not tensors and plain containers is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.errors import FormatError
from loraforge.formats.adapter_format import AdapterFormat, FileProbe, ModuleNames, check_finite_tensors, register_format
from loraforge.formats.diffusers_lora import diffusers_to_lora
from loraforge.formats.kohya import kohya_to_lora, lora_to_kohya
from loraforge.formats.lora import LoraState
from loraforge.formats.pickles import load_weights_only

if TYPE_CHECKING:
    from torch import Tensor


def load_slider_pt(path: Path) -> dict[str, Tensor]:
    """The flat {key: tensor} dict of a slider `.pt` file, loaded without running any pickled code."""
    from torch import Tensor

    obj = load_weights_only(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise FormatError(f"{path} does not hold a flat dict of named tensors")
    return dict(obj)


def read_slider_pt(path: Path, module_names: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    return kohya_to_lora(load_slider_pt(path), module_names)


def write_slider_pt(state: LoraState, path: Path) -> Path:
    import torch

    path = Path(path)
    torch.save(lora_to_kohya(state), path)
    return path


# What `_read` reports of a pickle's keys in the metadata it returns: "kohya" (a slider .pt) or "diffusers" (the
# pytorch_lora_weights.bin diffusers saved before safetensors), so an import records what the file is.
KEY_LAYOUT = "loraforge.pickle_keys"


def imported_format(fmt: str, metadata: Mapping[str, str]) -> tuple[str, str | None]:
    """(format, container) an adapter file read as `fmt` with reader `metadata` is, for its manifest: a pickle of
    diffusers keys is a diffusers file in a pickle container, not a slider .pt; any other file is its format
    (container None: the format's own)."""
    if fmt == "slider_pt" and metadata.get(KEY_LAYOUT) == "diffusers":
        return "diffusers", "pickle"
    return fmt, None


def _detect(probe: FileProbe) -> bool:
    return probe.container == "pickle"


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    from loraforge.formats.kohya import is_kohya_key

    sd = load_slider_pt(path)
    check_finite_tensors(sd)
    layout = "kohya" if sd and all(is_kohya_key(k) for k in sd) else "diffusers"
    # diffusers_to_lora hands kohya keys to kohya and reads diffusers' (pytorch_lora_weights.bin)
    return diffusers_to_lora(sd, None, module_names), {KEY_LAYOUT: layout}


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return [write_slider_pt(state, path)]


register_format(AdapterFormat("slider_pt", "Concept Sliders .pt (kohya keys, tensors-only pickle)", _read, _write, _detect))
