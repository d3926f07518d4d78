"""Streamed safetensors I/O: a reader that fetches one tensor (or a row range) at a time, and a writer
that writes the header up front from shapes and dtypes, then tensor bytes one by one.

The reader uses plain positioned reads rather than a memory map on purpose: pages touched through a
map stay in the process's resident set until it is unmapped, so streaming two 2 GB files through
`safe_open` would still show 4 GB of peak RSS. With `pread` only the tensor being merged is resident.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from loraforge.errors import FormatError
from loraforge.formats.detect import read_header

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_ST = ("F64", "F32", "F16", "BF16")


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of `fp32` / `fp16` / `bf16`; a one-line error naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise FormatError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: F16, F32, BF16 …
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_ST

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


class TensorFile:
    """One safetensors file opened for streamed reads: `get(key)` or `get(key, rows=(start, stop))`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = _parse_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def keys(self) -> list[str]:
        return list(self.entries)

    def span(self, key: str, rows: Optional[tuple[int, int]] = None) -> tuple[int, int, list[int]]:
        """(first byte, byte count, shape) of tensor `key`, or of rows start:stop of its first dimension."""
        info = self.entries[key]
        shape = list(info.shape)
        begin, end = info.begin, info.end
        if rows is not None and shape:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            start, stop = rows
            begin, end = info.begin + start * row_bytes, info.begin + stop * row_bytes
            shape[0] = stop - start
        return begin, end - begin, shape

    def get(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor `key` (or rows start:stop of its first dimension) in its stored dtype, newly allocated."""
        _, n, shape = self.span(key, rows)
        out = torch.empty(n, dtype=torch.uint8)
        return self.read_into(key, out, rows)

    def read_into(self, key: str, buffer: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Read tensor `key` (or a row range) into the start of the flat contiguous CPU `buffer` (any dtype,
        large enough) and return a view of it with the stored dtype and shape. Reusing one buffer keeps the
        allocator from mapping fresh pages for every tensor, which is both slower and what makes RSS creep."""
        info = self.entries[key]
        begin, n, shape = self.span(key, rows)
        raw = buffer.view(torch.uint8) if buffer.dtype != torch.uint8 else buffer
        if raw.numel() < n:
            raise ValueError(f"buffer of {raw.numel()} bytes is too small for {n} bytes of {key}")
        raw = raw[:n]
        if n:
            view = memoryview(raw.numpy())
            got = 0
            while got < n:
                chunk = os.preadv(self._fd, [view[got:]], self._data_start + begin + got)
                if chunk <= 0:
                    raise FormatError(f"{self.path} is truncated: tensor {key} could not be read")
                got += chunk
        return raw.view(info.torch_dtype).view(shape)


def _parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensor infos, metadata, data start) after `read_header` has checked every length and offset."""
    header, metadata = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    entries = {}
    for key, e in header.items():
        info = TensorInfo(e["dtype"], tuple(int(s) for s in e["shape"]), *map(int, e["data_offsets"]))
        if info.dtype not in ST_DTYPES:
            raise FormatError(f"{path}: tensor {key} has dtype {info.dtype}, which loraforge cannot merge")
        entries[key] = info
    return entries, metadata, 8 + n


class SafetensorsWriter:
    """Writes a safetensors file whose header is fixed up front; tensors then arrive one at a time,
    in the declared order, and go straight to disk. The file appears atomically on `close()`."""

    def __init__(self, path: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, shape, dtype in entries:
            if name in header:
                raise FormatError(f"tensor {name} is declared twice in {self.path.name}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise FormatError(f"tensor {name} was not declared in the header of {self.path.name}")
        want, shape, dtype, nbytes = self._order[self._next]
        if name != want:
            raise FormatError(f"tensor {name} written out of order: {want} comes next in {self.path.name}")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise FormatError(f"tensor {name} is {tensor.dtype}{list(tensor.shape)}, declared {dtype}{list(shape)}")
        self._append(tensor)
        self._next += 1

    def _append(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()) if data.dtype != torch.bool
                             else data.numpy().tobytes())

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write tensor `name` from row chunks (each already in the declared dtype)."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            raise FormatError(f"tensor {name} written out of order in {self.path.name}")
        _, _, dtype, nbytes = self._order[self._next]
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise FormatError(f"tensor {name}: chunk is {chunk.dtype}, declared {dtype}")
            self._append(chunk)
            written += chunk.numel() * chunk.element_size()
        if written != nbytes:
            raise FormatError(f"tensor {name}: wrote {written} bytes, declared {nbytes}")
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            self.abort()
            raise FormatError(f"{self.path.name} is incomplete: tensor {missing} was never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_streamed(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a dict of tensors through the streaming writer (in key order)."""
    keys = sorted(tensors)
    with SafetensorsWriter(path, [(k, tuple(tensors[k].shape), tensors[k].dtype) for k in keys], metadata) as w:
        for k in keys:
            w.write(k, tensors[k])
    return Path(path)
