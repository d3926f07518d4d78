"""The registry: versioned LoRA adapters, sliders, checkpoints and datasets with provenance.

Its names load on first use, so the light read path (`loraforge.registry.rows`, used by `registry
ls/show/lineage/tag`) does not pay for pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraforge.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
