"""Adapter module variants beyond the plain LoRA pair, one module each, registered by name: LoCon with a
Tucker core, LoHa, LoKr, DoRA, full weight differences and norm-layer differences (the LyCORIS family).

`loraforge.formats.lora.module_from_tensors` builds the right one from a file's suffixes.
"""

from loraforge.formats.variants import dora, full_diff, locon_tucker, loha, lokr, norm  # noqa: F401 (registers)
from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.dora import MAGNITUDE_SUFFIXES, Dora
from loraforge.formats.variants.registry import VARIANTS, register_variant

SUFFIXES = frozenset().union(*(set(c.required) | set(c.optional) for c in VARIANTS.values()), MAGNITUDE_SUFFIXES)

__all__ = ["MAGNITUDE_SUFFIXES", "SUFFIXES", "VARIANTS", "Dora", "VariantModule", "register_variant"]
