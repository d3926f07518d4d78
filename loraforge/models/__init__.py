"""Base models: the embedded tiny SD1/SDXL pipelines, base-model resolution, and pipeline helpers."""

from loraforge.models.base import BaseModel, base_from_path, locate_base
from loraforge.models.builtin import (
    BUILTIN_NAMES,
    build_tiny_components,
    build_tiny_pipeline,
    ensure_builtin,
    sd15_configs,
)
from loraforge.models.pipeline import (
    ddim_scheduler,
    default_dtype,
    generate,
    load_pipeline,
    lora_target_names,
    pick_device,
)

__all__ = [
    "BUILTIN_NAMES",
    "BaseModel",
    "base_from_path",
    "build_tiny_components",
    "build_tiny_pipeline",
    "ddim_scheduler",
    "default_dtype",
    "ensure_builtin",
    "generate",
    "load_pipeline",
    "locate_base",
    "lora_target_names",
    "pick_device",
    "sd15_configs",
]
