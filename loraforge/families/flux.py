"""Flux (Black Forest Labs): a diffusion transformer of double-stream (image + text) and single-stream blocks, a
CLIP ViT-L text encoder for the pooled vector and a T5 encoder for the sequence, a 16-channel VAE, trained as a
rectified flow (velocity prediction) with an embedded guidance scale (FLUX.1-dev).

Black Forest Labs' own checkpoints and kohya's LoRAs name the blocks `double_blocks.N` and `single_blocks.N`;
diffusers names them `transformer_blocks.N` and `single_transformer_blocks.N` (`loraforge.formats.flux_names`
maps one to the other)."""

from loraforge.families.base import Family, register_family

FLUX = register_family(Family(
    name="flux", label="Flux", pipeline_class="FluxPipeline", denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"), text_encoder_kinds=("clip", "t5"), prediction="flow",
    builtins=("tiny-flux",), hub_tags=("flux", "text-to-image"),
    standard_bases=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"),
    block_groups={"double": "transformer_blocks.", "single": "single_transformer_blocks."},
    merge_components=("transformer",),
))
