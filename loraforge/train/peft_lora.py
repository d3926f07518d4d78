"""Trainable LoRA layers injected with PEFT, their scales, and conversion back to a LoraState."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from loraforge.formats import LoraModule, LoraState
from loraforge.models.peft_layers import lora_layers
from loraforge.train.lora_targets import DEFAULT_UNET_TARGETS, LAYER_PRESETS, TEXT_ENCODER_TARGETS  # noqa: F401

def inject_lora(model: nn.Module, *, rank: int, alpha: float | None = None,
                target_modules: Iterable[str] | str = DEFAULT_UNET_TARGETS, adapter_name: str = "default",
                seed: int = 0) -> list[nn.Parameter]:
    """Add a trainable LoRA (B = 0, so the model is unchanged at first) to `model`'s matching layers.

    `target_modules` is a list of module-name endings or one regex (see LAYER_PRESETS). The initial A
    factors come from `seed`, without touching the global RNG. Returns the new parameters (fp32).
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT warns when a second adapter joins a model: joint training does that on purpose.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    params = []
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name):
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def module_shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape of every Linear and Conv2d of a loaded model (what LoRA can target)."""
    return {name: tuple(sub.weight.shape) for name, sub in model.named_modules()
            if isinstance(sub, (nn.Linear, nn.Conv2d))}


def check_rank(rank: int, shapes: dict[str, tuple[int, ...]], target_modules: Iterable[str] | str,
               component: str = "unet") -> None:
    """Refuse `rank` above min(in, out) of a module `target_modules` selects (PEFT's own matching), and
    targets that select nothing, before any LoRA weight is allocated. `shapes`: module path -> weight shape."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from loraforge.errors import ConfigError

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=1, target_modules=targets)
    # A conv LoRA factors the (out, in·kh·kw) matrix, so its rank is bounded by both.
    limits = {name: min(shape[0], math.prod(shape[1:])) for name, shape in shapes.items()
              if len(shape) in (2, 4) and check_target_module_exists(config, name)}  # norm layers: 1-D, no LoRA
    if not limits:
        raise ConfigError(f"target modules {targets!r} match no Linear or Conv2d module of the {component}; "
                          "give module names such as to_q, to_k, to_v, to_out.0")
    name = min(limits, key=limits.get)
    if rank > limits[name]:
        shape = "×".join(map(str, shapes[name]))
        raise ConfigError(f"rank {rank} is larger than {limits[name]}, the largest rank the targeted {component} "
                          f"modules allow (min(in, out); {name} is {shape}); use rank {limits[name]} or less")


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """Adapter parameters by their name in `model`, in a stable order (for checkpoints and optimisers)."""
    return {n: p for n, p in model.named_parameters()
            if f".{adapter_name}." in n and ("lora_A" in n or "lora_B" in n)}


def _canonical_path(component: str, name: str) -> str:
    """transformers 5 builds CLIPTextModel without its `text_model` wrapper; files (and LoraState) keep it (T5's
    `encoder.block.…` paths are left as they are)."""
    from loraforge.formats.lora import with_text_model

    if component.startswith("text_encoder"):
        name = with_text_model(name)
    return f"{component}.{name}"


def lora_state_from_module(model: nn.Module, component: str = "unet", adapter_name: str = "default",
                           state: LoraState | None = None, dtype: torch.dtype = torch.float32) -> LoraState:
    """The factors of PEFT adapter `adapter_name` injected into `model`, as a canonical LoraState (added to
    `state` when given). Not to be confused with ops.extract.extract_lora, which derives a LoRA from weights."""
    state = state if state is not None else LoraState()
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        down = layer.lora_A[adapter_name].weight.detach().to("cpu", dtype).clone()
        up = layer.lora_B[adapter_name].weight.detach().to("cpu", dtype).clone()
        state[_canonical_path(component, name)] = LoraModule(down=down, up=up,
                                                             alpha=float(layer.lora_alpha[adapter_name]))
    return state
