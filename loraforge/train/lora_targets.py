"""Module-name targets of trained LoRAs: the default UNet and text-encoder projections and the Concept
Sliders layer presets. Plain constants, without torch, so trainer configs validate without it."""

from __future__ import annotations

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ATTN = r"(to_q|to_k|to_v|to_out\.0)"
# Concept Sliders train-method presets, as PEFT regexes over UNet module paths.
LAYER_PRESETS: dict[str, str] = {
    "xattn": rf".*attn2\.{_ATTN}",
    "noxattn": rf".*(attn1\.{_ATTN}|ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in|attentions\.\d+\.proj_out)",
    "full": rf".*(attn1\.{_ATTN}|attn2\.{_ATTN}|ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in"
            rf"|attentions\.\d+\.proj_out|resnets\.\d+\.conv1|resnets\.\d+\.conv2)",
}
