"""The registry: versioned LoRA adapters, sliders, checkpoints and datasets with provenance."""

from loraforge.registry.manifest import (
    AdapterInfo, BaseInfo, DatasetInfo, FileEntry, Manifest, Parent, Provenance, RecipeInfo, SliderInfo,
)
from loraforge.registry.registry import LineageNode, Registry, VerifyReport

__all__ = [
    "AdapterInfo", "BaseInfo", "DatasetInfo", "FileEntry", "LineageNode", "Manifest", "Parent",
    "Provenance", "RecipeInfo", "Registry", "SliderInfo", "VerifyReport",
]
