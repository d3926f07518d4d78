"""LoRA adapters in memory (`LoraState`), the adapter file formats and the converters between them.

Formats register themselves, one module each; `read_adapter` / `write_adapter` reach all of them.
Every safetensors read or write goes through `safetensors_io`.
"""

from loraforge.formats.adapter_format import (
    FORMATS,
    AdapterFormat,
    FileProbe,
    detect_format,
    read_adapter,
    register_format,
    scan_adapter,
    write_adapter,
)
from loraforge.formats.diffusers_lora import diffusers_to_lora, lora_to_diffusers
from loraforge.formats.kohya import kohya_to_lora, lora_to_kohya
from loraforge.formats.lora import COMPONENTS, LoraModule, LoraState
from loraforge.formats.peft_folder import lora_to_peft, peft_to_lora, read_peft_folder, write_peft_folder
from loraforge.formats.safetensors_io import (
    RawTensor, read_header, read_raw_safetensors, read_safetensors, write_safetensors,
)
from loraforge.formats.slider_pt import load_slider_pt, read_slider_pt, write_slider_pt

__all__ = [
    "COMPONENTS", "FORMATS", "AdapterFormat", "FileProbe", "LoraModule", "LoraState", "RawTensor",
    "detect_format", "diffusers_to_lora", "kohya_to_lora", "load_slider_pt", "lora_to_diffusers",
    "lora_to_kohya", "lora_to_peft", "peft_to_lora", "read_adapter", "read_header", "read_peft_folder",
    "read_raw_safetensors", "read_safetensors", "read_slider_pt", "register_format", "scan_adapter",
    "write_adapter", "write_peft_folder", "write_safetensors", "write_slider_pt",
]
