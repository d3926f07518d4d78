"""Random adapters for demos, tests and benchmarks: right shapes for a base, seeded values.

torch is imported by the functions that make tensors, so the target lists (a recipe spec's defaults)
import without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    rank: int = 4,
    alpha: float | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    components: Iterable[str] | None = None,
    seed: int = 0,
    std: float = 0.1,
    dtype: torch.dtype | None = None,
):
    """A LoraState on every module of `shapes` whose path ends with one of `targets`.

    `shapes` is {component: {module path: weight shape}} (see `loraforge.models.targets`); `components` default
    to the denoiser `shapes` holds (the UNet, or a Flux transformer). Both
    factors are random (unlike a freshly initialised LoRA, whose up factor is zero), so the adapter
    visibly changes the model. `dtype` defaults to float32.
    """
    import torch

    from loraforge.formats.lora import LoraModule, LoraState

    dtype = torch.float32 if dtype is None else dtype

    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    if components is None:
        components = ("transformer",) if "transformer" in shapes and "unet" not in shapes else ("unet",)
    modules = {}
    for component in components:
        for path, shape in sorted(shapes.get(component, {}).items()):
            if not any(path == t or path.endswith("." + t) for t in targets):
                continue
            out_features, in_features = shape[0], shape[1]
            if len(shape) == 4:
                down = torch.randn((rank, in_features, *shape[2:]), generator=gen) * std
                up = torch.randn((out_features, rank, 1, 1), generator=gen) * std
            else:
                down = torch.randn((rank, in_features), generator=gen) * std
                up = torch.randn((out_features, rank), generator=gen) * std
            modules[f"{component}.{path}"] = LoraModule(down.to(dtype), up.to(dtype), alpha if alpha else rank)
    if not modules:
        raise ValueError(f"no module of the base matches targets {targets}")
    return LoraState(modules)


def perturbed_checkpoint(src_folder, dst, seed: int, scale: float = 0.05, components=None):
    """A copy of a diffusers folder whose float weights in `components` (default: its denoiser, the UNet or a
    Flux transformer, and text_encoder) get seeded noise added: a "fine-tuned" variant of the same architecture,
    for merge and extract tests."""
    import shutil
    from pathlib import Path

    import torch

    from loraforge.formats.safetensors_io import read_safetensors, write_safetensors

    src, dst = Path(src_folder), Path(dst)
    if components is None:
        components = ("transformer" if (src / "transformer").is_dir() else "unet", "text_encoder")
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for component in components:
        for path in sorted((dst / component).glob("*.safetensors")):
            state, _ = read_safetensors(path)
            for key in sorted(state):
                t = state[key]
                if t.is_floating_point():
                    state[key] = (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype)
            write_safetensors(state, path, {"format": "pt"})
    return dst
