"""loraforge's own adapter file: the canonical `LoraState` keys (`unet.<path>.lora_down.weight`) in
safetensors, with the spelling hints of the file it was converted from kept in the header."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from loraforge.errors import FormatError
from loraforge.formats import kohya
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.lora import COMPONENTS, LoraState, split_module_key
from loraforge.formats.safetensors_io import write_safetensors

HINTS_KEY = "loraforge.hints"


def _detect(probe: FileProbe) -> bool:
    keys = probe.keys
    splits = [split_module_key(k) for k in keys]
    return (probe.container == "safetensors" and bool(keys)
            and all(k.split(".", 1)[0] in COMPONENTS and split is not None for k, split in zip(keys, splits))
            and any(split[1] != "alpha" for split in splits))


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_finite_safetensors(path)
    return LoraState.from_state_dict(sd, hints=_parse_hints(meta)), meta


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = scan_finite_safetensors(path)
    return LoraState.from_state_dict(sd, hints=_parse_hints(meta)), meta


def _parse_hints(meta: Mapping[str, str]) -> dict[str, str]:
    """The spelling hints of a loraforge file's header; a damaged entry is refused, not ignored."""
    if HINTS_KEY not in meta:
        return {}
    fix = f"remove the {HINTS_KEY} header entry (it only records how keys were spelled)"
    try:
        hints = json.loads(meta[HINTS_KEY])
    except json.JSONDecodeError as e:
        raise FormatError(f"the {HINTS_KEY} header entry is not valid JSON ({e}); {fix}") from None
    if not isinstance(hints, dict) or not all(isinstance(v, str) for v in hints.values()):
        raise FormatError(f"the {HINTS_KEY} header entry must be a JSON object of strings, "
                          f"got {meta[HINTS_KEY][:60]!r}; {fix}")
    try:
        kohya.check_hints(hints)
    except FormatError as e:
        raise FormatError(f"the {HINTS_KEY} header entry is damaged: {e}; {fix}") from None
    return hints


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    header = {"format": "pt", **metadata}
    if state.hints:
        header[HINTS_KEY] = json.dumps(state.hints, sort_keys=True)
    return [write_safetensors(state.to_state_dict(), path, header)]


register_format(AdapterFormat("loraforge", "loraforge canonical .safetensors (unet.….lora_down)", _read, _write, _detect,
                              scan=_scan, writes_variants=True))
