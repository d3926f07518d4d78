"""Embedded base models: tiny SD1/SDXL pipelines built deterministically in code, and real SD1.5 shapes.

`builtin:tiny-sd` and `builtin:tiny-sdxl` follow the real module naming of SD1 and SDXL (so kohya
`lora_unet_...` / `lora_te_...` keys map onto them) but are a few hundred thousand parameters, so
tests and CPU-only machines can generate, train and merge without downloading weights.
Attention `proj_in`/`proj_out` are Linear layers (`use_linear_projection=True`, as in SD2/SDXL).

The names below are imported from their modules on first use: finding a builtin that is already on
disk (`ensure_builtin`, `check_builtin_name`) imports neither torch nor diffusers.
"""

from __future__ import annotations

from loraforge.lazy import lazy_exports

_MODULE_OF = {
    "BUILTIN_NAMES": "names",
    "BUILTIN_PREFIX": "names",
    "builtin_family": "names",
    "check_builtin_name": "names",
    "build_tiny_components": "components",
    "build_tiny_pipeline": "components",
    "sd15_configs": "sd15",
    "BUILTIN_SEED": "seed",
    "builtin_path": "store",
    "ensure_builtin": "store",
    "quiet_progress_bars": "store",
    "save_tiny_pipeline": "store",
    "tiny_clip_tokenizer": "tokenizer",
    "tiny_clip_vocab": "tokenizer",
    "calibration_images": "vae",
}

__all__ = sorted(_MODULE_OF)

__getattr__ = lazy_exports(__name__, _MODULE_OF)
