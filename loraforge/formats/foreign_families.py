"""Adapter keys of model families loraforge does not adapt, so a refusal can say which model a file is for.

loraforge adapts SD1.x, SDXL (UNet + CLIP text encoders) and Flux (a diffusion transformer with CLIP + T5).
LoRAs for the other diffusion transformers are common on the Hub and Civitai and carry unmistakable key
prefixes in every tool's spelling; the table below lists them, most specific first, each with the family it
names. A diffusers `transformer.` key is Flux's when its path is a Flux transformer module
(`flux_names.diffusers_module_of`: transformer_blocks / single_transformer_blocks, x_embedder, context_embedder,
time_text_embed, norm_out, proj_out), and another transformer's otherwise (SD3's pos_embed, PixArt's attn1 …).
kohya's `lora_te3_` (T5) is Flux's beside Flux transformer keys and SD3's third encoder without them.
Flattened diffusers paths (`lora_transformer_…`, LyCORIS' `lycoris_…`) are Flux's when they flatten a Flux module's
path (`flux_flat`), and another transformer's otherwise (`lora_transformer_pos_embed_proj`, `lycoris_pos_embed_proj`).
"""

from __future__ import annotations

from collections.abc import Iterable

from loraforge.formats import flux_flat
from loraforge.formats.flux_names import diffusers_module_of
from loraforge.formats.kohya_flux import T5_PREFIX, is_flux_file

OTHER_DIT = "a diffusion transformer other than Flux (SD3, PixArt, Sana, ...)"
# (key prefix, family). A prefix also matches after a leading `base_model.model.` (PEFT) wrapper.
SIGNATURES: tuple[tuple[str, str], ...] = (
    # SD3 / SD3.5: Stability's MMDiT block names (kohya sd-scripts writes them with lora_unet_)
    ("lora_unet_joint_blocks_", "SD3"),
    ("diffusion_model.joint_blocks.", "SD3"),
    ("joint_blocks.", "SD3"),
    (T5_PREFIX, "SD3 (T5 text encoder)"),
    ("text_encoder_3.", "SD3 (T5 text encoder)"),
    # any other diffusers transformer pipeline: the denoiser is `transformer`
    ("transformer.", OTHER_DIT),
    ("transformer_blocks.", OTHER_DIT),  # a PEFT folder of one
    ("single_transformer_blocks.", OTHER_DIT),
    ("lora_transformer_", OTHER_DIT),
    ("lycoris_transformer_", OTHER_DIT),
    ("lycoris_pos_embed_", OTHER_DIT),  # LyCORIS on SD3's / PixArt's transformer: its patch embedding
)
PEFT_WRAPPER = "base_model.model."
_TRANSFORMER = "transformer."


def _is_flux(key: str, flux_kohya: bool) -> bool:
    """Whether a key that matches a signature is Flux's after all, which loraforge reads."""
    if key.startswith(T5_PREFIX):
        return flux_kohya
    if key.startswith(_TRANSFORMER):
        return diffusers_module_of(key[len(_TRANSFORMER):]) is not None
    if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        return diffusers_module_of(key) is not None
    return flux_flat.is_flux_key(key)


def foreign_family(keys: Iterable[str]) -> tuple[str, str] | None:
    """(family, the first key that shows it) when any key belongs to a family loraforge does not adapt."""
    keys = sorted(keys)
    flux_kohya = is_flux_file(keys) or flux_flat.is_flux_file(keys)  # T5 keys are Flux's beside either naming
    for prefix, family in SIGNATURES:
        for key in keys:
            bare = key.removeprefix(PEFT_WRAPPER)
            if bare.startswith(prefix) and not _is_flux(bare, flux_kohya):
                return family, key
    return None


def refusal(where: str, keys: Iterable[str]) -> str | None:
    """The one-line reason a file of a foreign family is refused, or None when no key shows one."""
    found = foreign_family(keys)
    if found is None:
        return None
    family, key = found
    return (f"{where} is a LoRA for {family} (key {key}), an architecture loraforge does not adapt; "
            "it adapts SD1.x, SDXL (UNet and CLIP text encoders) and Flux")
