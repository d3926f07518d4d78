"""Adapter keys of model families loraforge does not adapt, so a refusal can say which model a file is for.

loraforge adapts SD1.x and SDXL (UNet + CLIP text encoders). LoRAs for the diffusion transformers are
common on the Hub and Civitai and carry unmistakable key prefixes in every tool's spelling; the table below
lists them, most specific first, each with the family it names. None of them can occur in an SD1/SDXL
adapter, so matching them never turns away a file loraforge could read.
"""

from __future__ import annotations

from collections.abc import Iterable

# (key prefix, family). A prefix also matches after a leading `base_model.model.` (PEFT) wrapper.
SIGNATURES: tuple[tuple[str, str], ...] = (
    # Flux: diffusers/PEFT spelling, kohya sd-scripts' spelling, BFL's own module names
    ("transformer.single_transformer_blocks.", "Flux"),
    ("single_transformer_blocks.", "Flux"),
    ("lora_unet_double_blocks_", "Flux"),
    ("lora_unet_single_blocks_", "Flux"),
    ("diffusion_model.double_blocks.", "Flux"),
    ("diffusion_model.single_blocks.", "Flux"),
    ("double_blocks.", "Flux"),
    ("single_blocks.", "Flux"),
    # SD3 / SD3.5: Stability's MMDiT block names (kohya sd-scripts writes them with lora_unet_)
    ("lora_unet_joint_blocks_", "SD3"),
    ("diffusion_model.joint_blocks.", "SD3"),
    ("joint_blocks.", "SD3"),
    ("lora_te3_", "SD3 (T5 text encoder)"),
    ("text_encoder_3.", "SD3 (T5 text encoder)"),
    # any other diffusers transformer pipeline (SD3, Flux, PixArt, Sana, ...): the denoiser is `transformer`
    ("transformer.", "a diffusion transformer (Flux, SD3, PixArt, ...)"),
    ("transformer_blocks.", "a diffusion transformer (Flux, SD3, PixArt, ...)"),  # a PEFT folder of one
    ("lora_transformer_", "a diffusion transformer (Flux, SD3, PixArt, ...)"),
    ("lycoris_transformer_", "a diffusion transformer (Flux, SD3, PixArt, ...)"),
)
PEFT_WRAPPER = "base_model.model."


def foreign_family(keys: Iterable[str]) -> tuple[str, str] | None:
    """(family, the first key that shows it) when any key belongs to a family loraforge does not adapt."""
    keys = sorted(keys)
    for prefix, family in SIGNATURES:
        for key in keys:
            if key.removeprefix(PEFT_WRAPPER).startswith(prefix):
                return family, key
    return None


def refusal(where: str, keys: Iterable[str]) -> str | None:
    """The one-line reason a file of a foreign family is refused, or None when no key shows one."""
    found = foreign_family(keys)
    if found is None:
        return None
    family, key = found
    return (f"{where} is a LoRA for {family} (key {key}), an architecture loraforge does not adapt; "
            "it adapts SD1.x and SDXL (UNet and CLIP text encoders)")
