"""Recognise an adapter file by its contents, and read or write it in any registered format.

Every safetensors header is checked against the file size before a byte of tensor data is read,
so a truncated or lying file fails with one line naming it instead of a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
import torch
from torch import Tensor

from loraforge.errors import FormatError
from loraforge.formats import diffusers_lora, kohya, peft_folder, slider_pt
from loraforge.formats.lora import ALPHA_SUFFIX, COMPONENTS, DOWN_SUFFIX, UP_SUFFIX, LoraState

ModuleNames = Mapping[str, Iterable[str]] | None

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 100 << 20
HINTS_KEY = "loraforge.hints"


# -- safetensors with a checked header -------------------------------------------------------

def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, `__metadata__`) of a safetensors file, after checking every offset fits."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            raise FormatError(f"{path} is truncated or not safetensors: its header claims {n} bytes "
                              f"but the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} has a safetensors header that is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} has a safetensors header that is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path} has a __metadata__ header entry that is not a map of strings")
    data_size = size - 8 - n
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(int(s) for s in shape)
            ok = dtype in DTYPE_SIZES and all(int(s) >= 0 for s in shape) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: header entry for tensor {key} is malformed") from None
        if not ok:
            raise FormatError(f"{path}: header entry for tensor {key} has a bad dtype, shape or offsets")
        if end > data_size:
            raise FormatError(f"{path} is truncated or its header lies: tensor {key} ends at byte {end} "
                              f"but the data section has {data_size} bytes")
        if end - begin != count * DTYPE_SIZES[dtype]:
            raise FormatError(f"{path}: header says tensor {key} is {dtype}{list(shape)} "
                              f"({count * DTYPE_SIZES[dtype]} bytes) but gives it {end - begin} bytes")
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise FormatError(f"{path}: header places tensors {key_a} and {key_b} in overlapping bytes")
    return header, metadata


def check_finite_tensors(sd: Mapping[str, Tensor]) -> None:
    """Raise FormatError naming the first key (as spelled in the file) holding NaN or Inf."""
    for key in sorted(sd):
        t = sd[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"tensor {key} contains NaN or Inf values")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the `__metadata__` of a safetensors file whose header was checked first."""
    read_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own untyped errors for damaged files
        raise FormatError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None


def write_safetensors(sd: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise FormatError(f"safetensors metadata values must be strings; {bad[0]!r} is not")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_bytes(sd, metadata))
    return path


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file as bytes with a deterministic layout: tensors and metadata sorted by name.

    `safetensors.save_file` orders metadata through a hash map, so the same adapter could give
    different bytes — and different content addresses — in different processes.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    chunks, offset = [], 0
    for name in sorted(sd):
        tensor = sd[name].detach().contiguous().cpu()
        if tensor.dtype not in _DTYPE_NAMES:
            raise FormatError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


# -- the formats -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterFormat:
    """A named adapter file format with its reader and writer."""

    name: str
    description: str
    read: Callable[[Path, ModuleNames], tuple[LoraState, dict[str, str]]]
    write: Callable[[LoraState, Path, Mapping[str, str]], list[Path]]


FORMATS: dict[str, AdapterFormat] = {}


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    if not fmt.name.isidentifier() or fmt.name != fmt.name.lower():
        raise FormatError(f"adapter format name {fmt.name!r} must be a lower-case identifier")
    if fmt.name in FORMATS:
        raise FormatError(f"adapter format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def _read_kohya(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_safetensors(path)
    check_finite_tensors(sd)
    return kohya.kohya_to_lora(sd, module_names), meta


def _write_kohya(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    return [write_safetensors(kohya.lora_to_kohya(state), path, {"format": "pt", **metadata})]


def _read_diffusers(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_safetensors(path)
    check_finite_tensors(sd)
    return diffusers_lora.diffusers_to_lora(sd, meta, module_names), meta


def _write_diffusers(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    sd, header = diffusers_lora.lora_to_diffusers(state)
    return [write_safetensors(sd, path, {**metadata, **header})]


def _read_loraforge(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_safetensors(path)
    check_finite_tensors(sd)
    return LoraState.from_state_dict(sd, hints=_parse_hints(meta)), meta


def _parse_hints(meta: Mapping[str, str]) -> dict[str, str]:
    """The spelling hints of a loraforge file's header; a damaged entry is refused, not ignored."""
    if HINTS_KEY not in meta:
        return {}
    fix = f"remove the {HINTS_KEY} header entry (it only records how keys were spelled)"
    try:
        hints = json.loads(meta[HINTS_KEY])
    except json.JSONDecodeError as e:
        raise FormatError(f"the {HINTS_KEY} header entry is not valid JSON ({e}); {fix}") from None
    if not isinstance(hints, dict) or not all(isinstance(v, str) for v in hints.values()):
        raise FormatError(f"the {HINTS_KEY} header entry must be a JSON object of strings, "
                          f"got {meta[HINTS_KEY][:60]!r}; {fix}")
    try:
        kohya.check_hints(hints)
    except FormatError as e:
        raise FormatError(f"the {HINTS_KEY} header entry is damaged: {e}; {fix}") from None
    return hints


def _write_loraforge(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    header = {"format": "pt", **metadata}
    if state.hints:
        header[HINTS_KEY] = json.dumps(state.hints, sort_keys=True)
    return [write_safetensors(state.to_state_dict(), path, header)]


def _read_peft(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    return peft_folder.read_peft_folder(path)


def _read_slider(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd = slider_pt.load_slider_pt(path)
    check_finite_tensors(sd)
    return kohya.kohya_to_lora(sd, module_names), {}


def _write_slider(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return [slider_pt.write_slider_pt(state, path)]


register_format(AdapterFormat("kohya", "kohya / A1111 / ComfyUI .safetensors (lora_unet_…)", _read_kohya, _write_kohya))
register_format(AdapterFormat("diffusers", "diffusers load_lora_weights .safetensors (unet.….lora_A)",
                              _read_diffusers, _write_diffusers))
register_format(AdapterFormat("peft", "PEFT adapter folder(s) (adapter_config.json)", _read_peft,
                              lambda state, path, metadata: peft_folder.write_peft_folder(state, path, metadata)))
register_format(AdapterFormat("loraforge", "loraforge canonical .safetensors (unet.….lora_down)",
                              _read_loraforge, _write_loraforge))
register_format(AdapterFormat("slider_pt", "Concept Sliders .pt (kohya keys, tensors-only pickle)",
                              _read_slider, _write_slider))


# -- detection and the public entry points ---------------------------------------------------

def _format_of_keys(keys: list[str]) -> str | None:
    if not keys:
        return None
    if all(kohya.is_kohya_key(k) for k in keys):
        return "kohya"
    canonical = (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX)
    if all(k.split(".", 1)[0] in COMPONENTS and k.endswith(canonical) for k in keys) and any(
        k.endswith(DOWN_SUFFIX) for k in keys
    ):
        return "loraforge"
    if all(k.startswith(peft_folder.PREFIX) for k in keys):
        return "peft"
    if all(diffusers_lora.is_diffusers_key(k) for k in keys):
        return "diffusers"
    return None


def detect_format(path: Path) -> str:
    """`kohya`, `diffusers`, `peft`, `slider_pt` or `loraforge`, judged by the file's contents."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    if path.is_dir():
        if peft_folder.is_peft_folder(path):
            return "peft"
        raise FormatError(f"{path} is a folder but not a PEFT adapter folder (no adapter_config.json)")
    with open(path, "rb") as f:
        head = f.read(9)
    # Safetensors first: its 8-byte length field can begin with any byte (0x80 for a header of
    # 0x480 bytes), so only a JSON object after it tells; read_header then checks every offset.
    if head[8:9] != b"{":
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive or a bare pickle
            if path.suffix.lower() == ".safetensors":
                raise FormatError(f"{path} is a torch pickle named .safetensors; rename it to "
                                  f"{path.with_suffix('.pt').name} to import it as a .pt file")
            return "slider_pt"
        raise FormatError(f"{path} is neither a safetensors file nor a torch .pt file")
    header, _ = read_header(path)
    fmt = _format_of_keys(sorted(header))
    if fmt == "peft":
        raise FormatError(f"{path} holds PEFT weights without their adapter_config.json; pass the adapter folder")
    if fmt is None:
        if not header:
            raise FormatError(f"{path} holds no tensors: the adapter is empty")
        raise FormatError(f"{path} is not a LoRA adapter in a known format (first key: {sorted(header)[0]})")
    return fmt


def read_adapter(path: Path, module_names: ModuleNames = None) -> tuple[LoraState, str, dict[str, str]]:
    """(state, detected format, safetensors header metadata) of an adapter file or folder."""
    path = Path(path)
    fmt = detect_format(path)
    try:
        state, metadata = FORMATS[fmt].read(path, module_names)
        if not state:
            raise FormatError("the adapter is empty")
        state.check_finite()
    except FormatError as e:
        message = str(e)
        raise type(e)(message if str(path) in message else f"{path}: {message}") from None
    return state, fmt, metadata


def write_adapter(state: LoraState, path: Path, fmt: str, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write `state` as `fmt`; a single file for file formats, a folder for `peft`."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown adapter format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    if not state:
        raise FormatError(f"refusing to write an empty adapter to {path}")
    return FORMATS[fmt].write(state, Path(path), dict(metadata or {}))
