"""`builtin:shapes`: the shapes world's text-to-image model, as standard diffusers components.

A `StableDiffusionPipeline` of a small `UNet2DConditionModel` (SD1 block names, so kohya `lora_unet_...`
keys, PEFT targets, merges and fuse work on it unchanged), the world's VAE (`shapes_vae`), a small
`CLIPTextModel` whose tokenizer has every word of the world as one token, and DDIM on SD's betas rescaled to
zero terminal SNR (v-prediction).
`loraforge/train/shapes_pretraining.py` trains the UNet and the text encoder from `new_components`; the
result ships in `shapes_pipeline/` beside this module as a diffusers folder (without the VAE, which ships in
`loraforge/world/vae/`) with `pretraining.json`, its provenance; `shapes_files.py` checks and installs both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraforge.world.shapes_vae import ARCHITECTURE as VAE_ARCHITECTURE
from loraforge.world.vocabulary import ATTRIBUTES, POSITION_SYNONYMS


# Every word a caption or a parsed prompt uses becomes one token (after the builtin tokenizer's own words).
WORLD_WORDS = tuple(dict.fromkeys(
    [w for values in ATTRIBUTES.values() for w in values] + list(POSITION_SYNONYMS)
    + "a of the on in background left right centre".split()))

# The VAE's 16x16 latent; no attention at that resolution (the 256-token self-attention cost most of a step on
# CPU), cross-attention to the prompt at 8x8 and 4x4.
UNET_ARCHITECTURE = {
    "sample_size": 16, "in_channels": VAE_ARCHITECTURE["latent_channels"],
    "out_channels": VAE_ARCHITECTURE["latent_channels"],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128], "layers_per_block": 1, "cross_attention_dim": 64,
    "attention_head_dim": 8, "norm_num_groups": 32, "use_linear_projection": True,
}
TEXT_ARCHITECTURE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 64,
}
# SD's scaled-linear betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al.,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"). Trained on SD's own schedule, the model read the
# background and position from the mean of the starting noise (a 16x16 latent's mean has std 1/16, as large as
# the signal SD's schedule leaves at t = 999) and ignored those words: one seed gave one background for every prompt.
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
}


def shapes_tokenizer():
    from loraforge.models.builtin.tokenizer import tiny_clip_tokenizer

    return tiny_clip_tokenizer(WORLD_WORDS)


def new_components(seed: int) -> dict:
    """Untrained UNet and text encoder (drawn from `seed`; the caller's random state is kept), with the
    tokenizer, the scheduler and the committed VAE: the starting point of pretraining."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraforge.world.shapes_vae import load_vae

    tokenizer = shapes_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_ARCHITECTURE)
        config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                **TEXT_ARCHITECTURE)
        text_encoder = CLIPTextModel(config)
    return {"unet": unet, "vae": load_vae(), "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler(**SCHEDULER), "safety_checker": None, "feature_extractor": None,
            "image_encoder": None, "requires_safety_checker": False}


def pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
