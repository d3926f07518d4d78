"""Base models: the embedded tiny SD1/SDXL pipelines, base-model resolution, and pipeline helpers.

The names below are imported from their modules on first use, so resolving a base (`locate_base`)
imports neither torch nor diffusers; loading a pipeline does.
"""

from __future__ import annotations

from loraforge.lazy import lazy_exports

_MODULE_OF = {
    "BaseModel": "base",
    "base_from_path": "base",
    "locate_base": "base",
    "BUILTIN_NAMES": "builtin",
    "build_tiny_components": "builtin",
    "build_tiny_pipeline": "builtin",
    "ensure_builtin": "builtin",
    "sd15_configs": "builtin",
    "ddim_scheduler": "pipeline",
    "default_dtype": "pipeline",
    "generate": "pipeline",
    "load_pipeline": "pipeline",
    "lora_target_names": "pipeline",
    "pick_device": "pipeline",
}

__all__ = sorted(_MODULE_OF)

__getattr__ = lazy_exports(__name__, _MODULE_OF)
