"""Model families: what loraforge knows of each architecture it adapts, in one place per family.

A `Family` names a pipeline's denoiser (`unet` or `transformer`), its text encoders, the diffusers pipeline
class, the training objective, the builtin test models and the Hub tags. Code that used to assume a UNet with
CLIP encoders asks the family instead; `family("flux")` is the description, `family_of_components` tells a
family from the components an adapter or a base holds. Torch-free: importing it costs nothing.
"""

from __future__ import annotations

from loraforge.families.base import (
    ADAPTER_COMPONENTS, FAMILIES, Family, check_same_family, describe, family, family_of_components, register_family,
)
from loraforge.families import flux, sd1, sdxl  # noqa: F401  (each registers its family)

__all__ = ["ADAPTER_COMPONENTS", "FAMILIES", "Family", "check_same_family", "describe", "family",
           "family_of_components", "register_family"]
