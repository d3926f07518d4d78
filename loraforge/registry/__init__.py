"""The registry: versioned LoRA adapters, sliders, checkpoints and datasets with provenance.

Its names load on first use, so the light read path (`loraforge.registry.rows`, used by `registry
ls/show/lineage/tag`) does not pay for pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AdapterInfo": "manifest", "BaseInfo": "manifest", "DatasetInfo": "manifest", "FileEntry": "manifest",
    "Manifest": "manifest", "Parent": "manifest", "Provenance": "manifest", "RecipeInfo": "manifest",
    "SliderInfo": "manifest", "LineageNode": "lineage", "Registry": "registry", "VerifyReport": "registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from loraforge.registry.lineage import LineageNode
    from loraforge.registry.manifest import (
        AdapterInfo, BaseInfo, DatasetInfo, FileEntry, Manifest, Parent, Provenance, RecipeInfo, SliderInfo,
    )
    from loraforge.registry.registry import Registry, VerifyReport


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
