"""Module names and weight shapes of a base model, read from safetensors headers (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from loraforge.families import ADAPTER_COMPONENTS as COMPONENTS
from loraforge.formats.safetensors_io import read_header


def _component_files(folder: Path, component: str) -> list[Path]:
    sub = folder / component
    if not sub.is_dir():
        return []
    return sorted(p for p in sub.glob("*.safetensors"))


def module_shapes(folder: Path, with_norms: bool = False) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module path: weight shape}} for every 2-D/4-D `.weight` of a diffusers folder (the layers
    a LoRA adapts); `with_norms` adds the 1-D weights of its norm layers, which LyCORIS norm modules adapt."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in COMPONENTS:
        shapes: dict[str, tuple[int, ...]] = {}
        for path in _component_files(Path(folder), component):
            for key, info in read_header(path)[0].items():
                if not key.endswith(".weight"):
                    continue
                shape = tuple(info["shape"])
                if len(shape) in (2, 4) or (with_norms and len(shape) == 1):
                    shapes[key[: -len(".weight")]] = shape
        if shapes:
            out[component] = shapes
    return out


def module_names(folder: Path) -> dict[str, list[str]]:
    return {c: sorted(s) for c, s in module_shapes(folder).items()}
