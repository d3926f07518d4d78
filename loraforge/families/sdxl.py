"""Stable Diffusion XL: a UNet with CLIP ViT-L and OpenCLIP ViT-bigG text encoders, trained to predict noise."""

from loraforge.families.base import Family, register_family

SDXL = register_family(Family(
    name="sdxl", label="SDXL", pipeline_class="StableDiffusionXLPipeline", denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"), text_encoder_kinds=("clip", "clip_g"), prediction="epsilon",
    builtins=("tiny-sdxl",), hub_tags=("stable-diffusion-xl", "text-to-image"),
    standard_bases=("stabilityai/stable-diffusion-xl-base-1.0",),
    block_groups={"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."},
    merge_components=("unet", "text_encoder", "vae"),
))
