"""Validation images: one row per prompt, one column per adapter scale, as a labelled grid PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from loraforge.models.peft_layers import set_lora_scale


@torch.no_grad()
def validation_grid(pipe, prompts: Sequence[str], scales: Sequence[float], *, adapter_name: str = "default",
                    seed: int = 0, steps: int = 8, resolution: int = 64, title: str | None = None):
    """Images of `prompts` with the adapter at each of `scales` (0 = the base), same noise per row."""
    from loraforge.families import family
    from loraforge.models.peft_layers import activate_adapter
    from loraforge.models.pipeline import generate, pipeline_family
    from loraforge.render.grid import image_grid

    # Text-encoder LoRAs (SDXL: both) belong to the adapter too: it is switched and scaled with the denoiser's.
    parts = [m for m in (getattr(pipe, name, None) for name in family(pipeline_family(pipe)).adapter_components)
             if m is not None]
    for part in parts:
        activate_adapter(part, adapter_name)
    rows = []
    try:
        for i, prompt in enumerate(prompts):
            row = []
            for scale in scales:
                for part in parts:
                    set_lora_scale(part, scale, adapter_name)
                row.append(generate(pipe, prompt, seed=seed + i, steps=steps, height=resolution, width=resolution))
            rows.append(row)
    finally:
        for part in parts:
            set_lora_scale(part, 1.0, adapter_name)
    return image_grid(rows, [p[:40] for p in prompts], [f"scale {s:g}" for s in scales], title=title)


def save_grid(grid, folder: Path, name: str = "validation.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    grid.save(path, format="PNG")
    return path
