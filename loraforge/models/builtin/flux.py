"""`builtin:tiny-flux`: a deterministic tiny Flux pipeline built in code — a FluxTransformer2DModel with two
double-stream and two single-stream blocks and the guidance embedding of FLUX.1-dev, a CLIP and a T5 text
encoder with generated tokenizers, a 16-channel AutoencoderKL without quant convs (as Flux's), and the
FlowMatchEulerDiscreteScheduler with FLUX.1-dev's resolution-dependent shift."""

from __future__ import annotations

from typing import Any

from loraforge.models.builtin.seed import seeded
from loraforge.models.builtin.t5_tokenizer import tiny_t5_tokenizer
from loraforge.models.builtin.tokenizer import tiny_clip_tokenizer

# Widths: the transformer's inner width is heads x head dim; rotary axes split the head dim (Flux: 16+56+56).
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
TEXT_WIDTH = 32  # both encoders: T5's sequence width (joint_attention_dim) and CLIP's pooled width
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 2
# Images are drawn at this size unless asked otherwise: 64 px is 16x16 latents, 8x8 = 64 image tokens.
DEFAULT_SIZE = 64


def _clip_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    from loraforge.models.builtin.text_models import text_config as _text_config, text_encoder as _text_encoder

    return _text_encoder(CLIPTextModel, _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id,
                                                     projection=False))


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(config)
    import torch

    with torch.no_grad():  # as for CLIP: token embeddings that dominate, so prompts differ where words do
        model.shared.weight.normal_(0.0, 1.0)
    return model


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=16,
        sample_size=DEFAULT_SIZE, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5035, shift_factor=0.0609,  # FLUX.1's
    )


def tiny_flux_components() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    seeded(21)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=DOUBLE_BLOCKS, num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True, axes_dims_rope=AXES,
    )
    seeded(22)
    vae = _vae()
    seeded(23)
    text_encoder = _clip_text_encoder(tokenizer)
    seeded(24)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's schedule
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}
