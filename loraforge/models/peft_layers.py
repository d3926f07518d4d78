"""The LoRA layers PEFT injected into a loaded model: listing them, scaling them, choosing the active adapter.

Training injects them and rendering (illusions, validation grids) switches between them, so they are
model utilities, below both.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def lora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str = "default") -> None:
    """Multiply adapter `adapter_name`'s ΔW by `scale` (0 turns it off, −1 reverses it)."""
    for _, layer in lora_layers(model):
        layer.set_scale(adapter_name, scale)


def activate_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the only active adapter of every LoRA layer (others keep their weights)."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer._active_adapter = [adapter_name]
