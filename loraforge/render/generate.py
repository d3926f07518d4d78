"""One image from a base and adapters."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from loraforge.errors import ConfigError

# Diffusers' Stable Diffusion pipelines refuse sizes that are not whole 8-pixel latent blocks.
LATENT_BLOCK = 8


def size_problem(size: Optional[int], name: str = "size") -> Optional[str]:
    """Why `size` cannot be an image size (None when it can, or when it is left to the model)."""
    if size is None or (size >= LATENT_BLOCK and size % LATENT_BLOCK == 0):
        return None
    fix = max(LATENT_BLOCK, -(-size // LATENT_BLOCK) * LATENT_BLOCK)
    return (f"{name} {size} is not a positive multiple of {LATENT_BLOCK} (images are made of "
            f"{LATENT_BLOCK}-pixel latent blocks): use {name} {fix}")


def check_generation(steps: int, size: Optional[int], *, steps_name: str = "steps", size_name: str = "size") -> None:
    """Refuse a step count or size the pipeline would fail on (or, for size 0, quietly replace)."""
    if steps < 1:
        raise ConfigError(f"{steps_name} {steps} is not a number of denoising steps: use {steps_name} 1 or more")
    problem = size_problem(size, size_name)
    if problem:
        raise ConfigError(problem)


def generate_image(registry, base_ref: str, lora_specs: Sequence[str], prompt: str, *, seed: int = 0,
                   steps: int = 20, guidance: float = 5.0, negative_prompt: Optional[str] = None,
                   size: Optional[int] = None, config: Optional[str] = None,
                   warn: Optional[Callable[[str], None]] = None):
    """One image; `warn` (default: a UserWarning) hears of each slider used outside its recorded scale range."""
    from loraforge.models.pipeline import generate
    from loraforge.render.adapters import load_pipeline_with_adapters
    from loraforge.render.sliders import default_warn, slider_range_problem

    check_generation(steps, size)
    pipe, _base, loaded = load_pipeline_with_adapters(registry, base_ref, lora_specs, config=config)
    for (_state, weight, manifest), spec in zip(loaded, lora_specs):
        problem = slider_range_problem(manifest, manifest.ref if manifest else spec, weight)
        if problem:
            (warn or default_warn)(problem)
    return generate(pipe, prompt, seed=seed, steps=steps, guidance=guidance, height=size, width=size,
                    negative_prompt=negative_prompt)


def render_rows(pipe, rows: Sequence[tuple[str, int]], *, steps: int, guidance: float, size: Optional[int] = None,
                negative_prompt: Optional[str] = None) -> list:
    """One image per (prompt, seed) row in one batched call: one generator per row, so each row's noise is exactly
    what a single-image call with that seed draws (small models run far faster batched)."""
    import torch

    from loraforge.models.pipeline import call_kwargs

    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in rows]
    negative = [negative_prompt] * len(rows) if negative_prompt else None
    kwargs = call_kwargs(pipe, guidance=guidance, height=size, width=size, negative_prompt=negative)
    result = pipe([p for p, _ in rows], num_inference_steps=steps, generator=generators, output_type="pil", **kwargs)
    return list(result.images)
