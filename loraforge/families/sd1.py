"""Stable Diffusion 1.x: a UNet with one CLIP ViT-L text encoder, trained to predict noise."""

from loraforge.families.base import Family, register_family

SD1 = register_family(Family(
    name="sd1", label="SD1.x", pipeline_class="StableDiffusionPipeline", denoiser="unet",
    text_encoders=("text_encoder",), text_encoder_kinds=("clip",), prediction="epsilon",
    builtins=("tiny-sd", "shapes"), hub_tags=("stable-diffusion", "text-to-image"),
    standard_bases=("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    block_groups={"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."},
    merge_components=("unet", "text_encoder", "vae"),
))
