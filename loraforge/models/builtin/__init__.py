"""Embedded base models: tiny SD1/SDXL pipelines built deterministically in code, and real SD1.5 shapes.

`builtin:tiny-sd` and `builtin:tiny-sdxl` follow the real module naming of SD1 and SDXL (so kohya
`lora_unet_...` / `lora_te_...` keys map onto them) but are a few hundred thousand parameters, so
tests and CPU-only machines can generate, train and merge without downloading weights.
Attention `proj_in`/`proj_out` are Linear layers (`use_linear_projection=True`, as in SD2/SDXL).
"""

from loraforge.models.builtin.components import (
    BUILTIN_NAMES,
    BUILTIN_PREFIX,
    build_tiny_components,
    build_tiny_pipeline,
    builtin_family,
    check_builtin_name,
)
from loraforge.models.builtin.sd15 import sd15_configs
from loraforge.models.builtin.seed import BUILTIN_SEED
from loraforge.models.builtin.store import builtin_path, ensure_builtin, quiet_progress_bars, save_tiny_pipeline
from loraforge.models.builtin.tokenizer import tiny_clip_tokenizer, tiny_clip_vocab
from loraforge.models.builtin.vae import calibration_images

__all__ = [
    "BUILTIN_NAMES",
    "BUILTIN_PREFIX",
    "BUILTIN_SEED",
    "build_tiny_components",
    "build_tiny_pipeline",
    "builtin_family",
    "builtin_path",
    "calibration_images",
    "check_builtin_name",
    "ensure_builtin",
    "quiet_progress_bars",
    "save_tiny_pipeline",
    "sd15_configs",
    "tiny_clip_tokenizer",
    "tiny_clip_vocab",
]
