"""The builtin models' CLIP text encoders: tiny configs, and token embeddings scaled so prompts matter."""

from __future__ import annotations

import torch


def text_config(vocab_size: int, eos_id: int, bos_id: int, *, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if not projection else "gelu",
        projection_dim=32,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


# CLIP draws token and position embeddings with the same std (0.02), so a random tiny encoder's output hardly
# depends on the prompt. Token embeddings with std 1 dominate the residual stream: prompts differ where words do.
_TOKEN_EMBEDDING_STD = 1.0


def text_encoder(cls, config):
    model = cls(config)
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    with torch.no_grad():
        embeddings.token_embedding.weight.mul_(_TOKEN_EMBEDDING_STD / (config.initializer_range * config.initializer_factor))
    return model
