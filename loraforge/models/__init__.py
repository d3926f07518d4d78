"""Base models: the embedded tiny SD1/SDXL pipelines, base-model resolution, and pipeline helpers.

The names below are imported from their modules on first use, so resolving a base (`locate_base`)
imports neither torch nor diffusers; loading a pipeline does.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
