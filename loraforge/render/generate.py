"""One image from a base and adapters."""

from __future__ import annotations

from typing import Optional, Sequence


def generate_image(registry, base_ref: str, lora_specs: Sequence[str], prompt: str, *, seed: int = 0,
                   steps: int = 20, guidance: float = 5.0, negative_prompt: Optional[str] = None,
                   size: Optional[int] = None):
    from loraforge.models.pipeline import generate
    from loraforge.render.adapters import load_pipeline_with_adapters

    pipe, _base, _loaded = load_pipeline_with_adapters(registry, base_ref, lora_specs)
    return generate(pipe, prompt, seed=seed, steps=steps, guidance=guidance, height=size, width=size,
                    negative_prompt=negative_prompt)
