"""The builtin pipelines' components (UNet, VAE, text encoders, tokenizers, scheduler), built in code
from fixed seeds (their names and families are `loraforge.models.builtin.names`)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from loraforge.models.builtin.names import BUILTIN_FAMILIES, check_builtin_name
from loraforge.models.builtin.seed import seeded
from loraforge.models.builtin.text_models import text_config as _text_config, text_encoder as _text_encoder
from loraforge.models.builtin.tokenizer import tiny_clip_tokenizer
from loraforge.models.builtin.vae import tiny_vae


# attn2.to_q/to_k start at this multiple of their random init: sharper cross-attention (logits x9) that
# picks out content tokens instead of spreading uniformly over the 77 mostly-padding tokens.
_CROSS_ATTENTION_QK_GAIN = 6.0


def _sharpen_cross_attention(unet) -> None:
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):
                module.weight.mul_(_CROSS_ATTENTION_QK_GAIN)


def _tiny_sd_components() -> dict[str, Any]:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    seeded(1)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
        use_linear_projection=True,
    )
    _sharpen_cross_attention(unet)
    vae = tiny_vae(seed_offset=2)
    seeded(3)
    text_encoder = _text_encoder(
        CLIPTextModel,
        _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, projection=False)
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _tiny_sdxl_components() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    time_embed_dim = 8
    text_2_projection = 32
    seeded(11)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # hidden sizes of text_encoder (32) + text_encoder_2 (32)
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_2_projection,
    )
    _sharpen_cross_attention(unet)
    vae = tiny_vae(seed_offset=12)
    seeded(13)
    text_encoder = _text_encoder(
        CLIPTextModel,
        _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, projection=False)
    )
    seeded(14)
    text_encoder_2 = _text_encoder(
        CLIPTextModelWithProjection,
        _text_config(len(tokenizer_2), tokenizer_2.eos_token_id, tokenizer_2.bos_token_id, projection=True)
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
    }


def _tiny_flux_components() -> dict[str, Any]:
    from loraforge.models.builtin.flux import tiny_flux_components

    return tiny_flux_components()


_BUILDERS = {"tiny-sd": _tiny_sd_components, "tiny-sdxl": _tiny_sdxl_components, "tiny-flux": _tiny_flux_components}
_BUILD_LOCK = threading.Lock()


def build_tiny_components(name: str) -> dict[str, Any]:
    """The modules of a builtin pipeline, in memory; pass them as `Pipeline(**components)`."""
    name = check_builtin_name(name)
    # Modules draw their initial weights from the global RNG, reseeded per component: hold a lock so
    # two threads building at once cannot interleave draws, and give the caller its RNG state back.
    with _BUILD_LOCK:
        state = torch.random.get_rng_state()
        try:
            return _BUILDERS[name]()
        finally:
            torch.random.set_rng_state(state)


def build_tiny_pipeline(name: str):
    """A builtin pipeline in memory, of its family's diffusers pipeline class."""
    import diffusers

    from loraforge.families import family

    name = check_builtin_name(name)
    cls = getattr(diffusers, family(BUILTIN_FAMILIES[name]).pipeline_class)
    pipe = cls(**build_tiny_components(name))
    pipe.set_progress_bar_config(disable=True)
    return pipe
