"""Module-name targets of trained LoRAs: the default denoiser and text-encoder projections and the Concept
Sliders layer presets, per model family. Plain constants, without torch, so trainer configs validate without it."""

from __future__ import annotations

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Flux's transformer: the image stream's and the text stream's attention projections of the joint attention (the
# single blocks have to_q/k/v only), as diffusers' Flux LoRA example targets them.
FLUX_TRANSFORMER_TARGETS = DEFAULT_UNET_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# The attention projections of each kind of text encoder (CLIP, OpenCLIP bigG, T5).
TEXT_ENCODER_TARGETS_OF_KIND = {"clip": TEXT_ENCODER_TARGETS, "clip_g": TEXT_ENCODER_TARGETS, "t5": ("q", "k", "v", "o")}
_ATTN = r"(to_q|to_k|to_v|to_out\.0)"
# Concept Sliders train-method presets, as PEFT regexes over UNet module paths.
LAYER_PRESETS: dict[str, str] = {
    "xattn": rf".*attn2\.{_ATTN}",
    "noxattn": rf".*(attn1\.{_ATTN}|ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in|attentions\.\d+\.proj_out)",
    "full": rf".*(attn1\.{_ATTN}|attn2\.{_ATTN}|ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in"
            rf"|attentions\.\d+\.proj_out|resnets\.\d+\.conv1|resnets\.\d+\.conv2)",
}
# On Flux's transformer, whose text and image tokens attend jointly (no cross-attention to leave out or keep):
# noxattn = the image stream (its attention projections and feed-forwards, the single blocks' MLP and output);
# full adds the text stream's projections and feed-forwards. `xattn` has no Flux counterpart and is refused.
FLUX_LAYER_PRESETS: dict[str, str] = {
    "noxattn": rf".*(attn\.{_ATTN}|\.ff\.net\.0\.proj|\.ff\.net\.2|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))",
    "full": rf".*(attn\.{_ATTN}|attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|\.ff\.net\.0\.proj|\.ff\.net\.2"
            rf"|ff_context\.net\.0\.proj|ff_context\.net\.2|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))",
}


def default_denoiser_targets(family: str) -> tuple[str, ...]:
    """The denoiser modules a LoRA targets unless told otherwise."""
    return FLUX_TRANSFORMER_TARGETS if family == "flux" else DEFAULT_UNET_TARGETS


def layer_presets(family: str) -> dict[str, str]:
    """The slider layer presets that mean something on `family`'s denoiser."""
    return FLUX_LAYER_PRESETS if family == "flux" else LAYER_PRESETS
