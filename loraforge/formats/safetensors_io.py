"""Every safetensors read and write in loraforge: a checked header, a streaming reader, a streaming
writer with a deterministic layout, and the one table of dtypes.

torch is imported by the functions that make torch tensors, not by this module: checking a header and
reading a file as `RawTensor`s (its bytes, shapes and dtypes) needs only the standard library, so a
command that checks and stores an adapter starts without torch.

Every header is checked against the file size before a byte of tensor data is read, so a truncated
or lying file fails with one line naming it instead of a crash or a huge allocation.

The reader uses plain positioned reads rather than a memory map on purpose: pages touched through a
map stay in the process's resident set until it is unmapped, so streaming two 2 GB files through
`safetensors.safe_open` would still show 4 GB of peak RSS. With `pread` only the tensor being merged
is resident.

The writer sorts metadata (and `write_safetensors` sorts tensors) itself: `safetensors.save_file`
orders metadata through a hash map, so the same adapter could give different bytes — and different
content addresses — in different processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from loraforge.errors import FormatError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# safetensors dtype name → (bytes per element, torch dtype name). The sizes check headers of any file;
# a dtype the installed torch lacks (uint16 and up before torch 2.3) can be checked but not read.
_DTYPE_TABLE = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"),
}
DTYPE_SIZES: dict[str, int] = {name: size for name, (size, _) in _DTYPE_TABLE.items()}
TORCH_NAMES: dict[str, str] = {name: t for name, (_, t) in _DTYPE_TABLE.items()}  # F16 → float16
_ST_OF_TORCH_NAME = {t: name for name, t in TORCH_NAMES.items()}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})
# What a streamed reader hands to the merge code: torch has CPU arithmetic for these. float8 and the
# wide unsigned integers would have to be converted first, which no merge does yet.
STREAMABLE = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})
# The precisions a user names on the command line and in recipes (torch dtypes: see PRECISIONS).
PRECISION_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class _TorchTables:
    st_dtypes: dict[str, "torch.dtype"]  # safetensors name → torch dtype, for the dtypes this torch has
    torch_to_st: dict["torch.dtype", str]
    precisions: dict[str, "torch.dtype"]


@functools.cache
def _torch_tables() -> _TorchTables:
    import torch

    st = {name: getattr(torch, t) for name, t in TORCH_NAMES.items() if isinstance(getattr(torch, t, None), torch.dtype)}
    return _TorchTables(st, {v: k for k, v in st.items()},
                        {p: getattr(torch, t) for p, t in PRECISION_NAMES.items()})


def __getattr__(name: str) -> Any:
    # ST_DTYPES, TORCH_TO_ST and PRECISIONS hold torch dtypes: made (and torch imported) on first use.
    tables = {"ST_DTYPES": "st_dtypes", "TORCH_TO_ST": "torch_to_st", "PRECISIONS": "precisions"}
    if name in tables:
        return getattr(_torch_tables(), tables[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_from_name(name: str) -> "torch.dtype":
    """torch dtype of `fp32` / `fp16` / `bf16`; a one-line error naming the choices otherwise."""
    if name not in PRECISION_NAMES:
        raise FormatError(f"unknown dtype {name!r}: choose one of {', '.join(PRECISION_NAMES)}")
    return _torch_tables().precisions[name]


def st_dtype(name: str, dtype: Union["torch.dtype", str]) -> str:
    """The safetensors spelling of `dtype` (a torch dtype, or the torch name of a RawTensor's dtype),
    or a FormatError naming tensor `name`."""
    if isinstance(dtype, str):
        if dtype not in _ST_OF_TORCH_NAME:
            raise FormatError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        return _ST_OF_TORCH_NAME[dtype]
    torch_to_st = _torch_tables().torch_to_st
    if dtype not in torch_to_st:
        raise FormatError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
    return torch_to_st[dtype]


# -- reading ---------------------------------------------------------------------------------

def _read_checked_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, `__metadata__`, first byte of the data section), every offset checked."""
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
    return header, metadata, 8 + n


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, `__metadata__`) of a safetensors file, after checking every offset fits."""
    header, metadata, _ = _read_checked_header(path)
    return header, metadata


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, from its checked header (no weights read)."""
    return {key: tuple(int(s) for s in entry["shape"]) for key, entry in read_header(path)[0].items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: F16, F32, BF16 …
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def torch_dtype(self) -> "torch.dtype":
        return _torch_tables().st_dtypes[self.dtype]


class TensorFile:
    """One safetensors file opened for streamed reads: `get(key)` or `get(key, rows=(start, stop))`.

    `dtypes` are the safetensors dtypes the caller can use; a file holding another is refused on open.
    """

    def __init__(self, path: Path, dtypes: Iterable[str] = STREAMABLE, purpose: str = "merge"):
        self.path = Path(path)
        header, self.metadata, self._data_start = _read_checked_header(self.path)
        allowed = set(dtypes) & set(_torch_tables().st_dtypes)
        self.entries: dict[str, TensorInfo] = {}
        for key, e in header.items():
            info = TensorInfo(e["dtype"], tuple(int(s) for s in e["shape"]), *map(int, e["data_offsets"]))
            if info.dtype not in allowed:
                raise FormatError(f"{self.path}: tensor {key} has dtype {info.dtype}, which loraforge cannot {purpose}")
            self.entries[key] = info
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

    def get(self, key: str, rows: Optional[tuple[int, int]] = None) -> Tensor:
        """The tensor `key` (or rows start:stop of its first dimension) in its stored dtype, newly allocated."""
        import torch

        _, n, shape = self.span(key, rows)
        out = torch.empty(n, dtype=torch.uint8)
        return self.read_into(key, out, rows)

    def read_into(self, key: str, buffer: Tensor, rows: Optional[tuple[int, int]] = None) -> Tensor:
        """Read tensor `key` (or a row range) into the start of the flat contiguous CPU `buffer` (any dtype,
        large enough) and return a view of it with the stored dtype and shape. Reusing one buffer keeps the
        allocator from mapping fresh pages for every tensor, which is both slower and what makes RSS creep."""
        import torch

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


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the `__metadata__` of a safetensors file whose header was checked first."""
    with TensorFile(path, dtypes=_torch_tables().st_dtypes, purpose="read with this torch") as f:
        return {k: f.get(k) for k in f.keys()}, dict(f.metadata)


# -- reading without torch -------------------------------------------------------------------

# Where a float's exponent lies: its bits within the top 16 bits of an element (in the one byte of a
# float8). An element is NaN or Inf exactly when all of them are set (float8 e4m3fn has NaN only).
_EXPONENT_TOP16 = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F80, "F64": 0x7FF0}
_EXPONENT_BYTE = {"F8_E5M2": 0x7C, "F8_E4M3": 0x7F}
_SCALAR_FORMATS = {"BOOL": "?", "U8": "B", "I8": "b", "I16": "h", "U16": "H", "F16": "e", "I32": "i", "U32": "I",
                   "F32": "f", "I64": "q", "U64": "Q", "F64": "d"}


@functools.cache
def _bytes_with_bits(mask: int) -> tuple[bytes, bytes]:
    """(the byte values with every bit of `mask` set, a bytes.translate table flagging them with 1)."""
    table = bytes(int(b & mask == mask) for b in range(256))
    return bytes(b for b in range(256) if table[b]), table


def _bytes_all_finite(dtype: str, buffer: bytes | bytearray, begin: int, end: int) -> bool:
    """Whether no element of the little-endian float data buffer[begin:end] of safetensors `dtype` is
    NaN or Inf. Slicing bytes by a step and searching them run in C, about a byte per nanosecond: the
    byte holding an element's top exponent bits is searched first, the next one only when that hits."""
    size = DTYPE_SIZES[dtype]
    if dtype in _EXPONENT_BYTE:
        high, high_mask, low_mask = buffer[begin:end], _EXPONENT_BYTE[dtype], 0
    else:
        high = buffer[begin + size - 1:end:size]
        high_mask, low_mask = _EXPONENT_TOP16[dtype] >> 8, _EXPONENT_TOP16[dtype] & 0xFF
    bad_high, high_table = _bytes_with_bits(high_mask)
    if not any(b in high for b in bad_high):
        return True
    if not low_mask:
        return False
    low = buffer[begin + size - 2:end:size]
    flags = int.from_bytes(high.translate(high_table), "little")
    return not flags & int.from_bytes(low.translate(_bytes_with_bits(low_mask)[1]), "little")


def _float8_value(dtype: str, byte: int) -> float:
    if dtype == "F8_E5M2":  # the top byte of a float16
        return struct.unpack("<e", bytes((0, byte)))[0]
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 7
    if exponent == 0xF and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


class RawTensor:
    """A tensor as a safetensors file stores it: its bytes, shape and dtype, read without torch.

    It answers what checks and converters ask of a tensor (`shape`, `dim()`, `numel()`, `dtype` as
    torch's name, `is_floating_point()`, `item()` of a scalar, whether it is finite) and is written
    back byte for byte, so an adapter can be checked and stored in another layout without torch.
    """

    __slots__ = ("st_dtype", "shape", "_buffer", "_begin", "_end", "_finite")

    def __init__(self, st_dtype: str, shape: Iterable[int], buffer: bytes | bytearray, begin: int = 0,
                 end: Optional[int] = None):
        """The tensor held in buffer[begin:end] (all of `buffer` by default)."""
        self.st_dtype = st_dtype
        self.shape = tuple(int(s) for s in shape)
        self._buffer, self._begin, self._end = buffer, begin, len(buffer) if end is None else end
        self._finite: Optional[bool] = None

    @property
    def data(self) -> memoryview:
        return memoryview(self._buffer)[self._begin:self._end]

    @property
    def dtype(self) -> str:
        return TORCH_NAMES[self.st_dtype]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return DTYPE_SIZES[self.st_dtype]

    def is_floating_point(self) -> bool:
        return self.st_dtype in FLOAT_DTYPES

    def contiguous(self) -> "RawTensor":
        return self

    def all_finite(self) -> bool:
        """Whether no value is NaN or Inf (always, for integer dtypes)."""
        if self._finite is None:
            self._finite = not self.is_floating_point() or _bytes_all_finite(self.st_dtype, self._buffer,
                                                                             self._begin, self._end)
        return self._finite

    def item(self) -> float | int | bool:
        """The value of a one-element tensor, as torch's `Tensor.item()` gives it."""
        if self.numel() != 1:
            raise ValueError(f"a tensor of shape {self.shape} has {self.numel()} values, not one")
        raw = self.data.tobytes()
        if self.st_dtype == "BF16":  # the top half of a float32
            return struct.unpack("<f", b"\0\0" + raw)[0]
        if self.st_dtype in _EXPONENT_BYTE:
            return _float8_value(self.st_dtype, raw[0])
        return struct.unpack("<" + _SCALAR_FORMATS[self.st_dtype], raw)[0]

    def rows(self, start: int, stop: int) -> "RawTensor":
        """Rows start:stop of the first axis: a view on the same bytes."""
        row = math.prod(self.shape[1:]) * self.element_size()
        return RawTensor(self.st_dtype, (stop - start, *self.shape[1:]), self._buffer,
                         self._begin + start * row, self._begin + stop * row)

    @classmethod
    def cat_rows(cls, parts: "list[RawTensor]") -> "RawTensor":
        """The tensors stacked along their first axis (one dtype, the same trailing shape)."""
        if len({(p.st_dtype, p.shape[1:]) for p in parts}) != 1:
            raise FormatError("tensors of different dtypes or widths cannot be stacked by rows")
        return cls(parts[0].st_dtype, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]),
                   b"".join(p.data.tobytes() for p in parts))

    @classmethod
    def float32_scalar(cls, value: float) -> "RawTensor":
        """A 0-d float32 tensor of `value`, rounded as torch rounds a Python float (to nearest)."""
        try:
            data = struct.pack("<f", value)
        except OverflowError:  # finite in float64 but beyond float32: torch stores infinity
            data = struct.pack("<f", math.copysign(math.inf, value))
        return cls("F32", (), data)

    def __repr__(self) -> str:
        return f"RawTensor({self.st_dtype}{list(self.shape)})"


def all_finite(tensor: Union["Tensor", RawTensor]) -> bool:
    """Whether no value of a torch or raw tensor is NaN or Inf (always, for integer dtypes)."""
    if isinstance(tensor, RawTensor):
        return tensor.all_finite()
    import torch

    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def read_raw_safetensors(path: Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """All tensors of a safetensors file as RawTensors over one read of its data section, and its
    `__metadata__`; the header is checked first. No torch."""
    path = Path(path)
    header, metadata, start = _read_checked_header(path)
    spans = {key: (int(e["data_offsets"][0]), int(e["data_offsets"][1])) for key, e in header.items()}
    length = max((end for _, end in spans.values()), default=0)
    data = bytearray(length)
    with open(path, "rb") as f, memoryview(data) as view:
        f.seek(start)
        got = 0
        while got < length:
            n = f.readinto(view[got:])
            if not n:
                raise FormatError(f"{path} is truncated: it ended {length - got} bytes before its last tensor")
            got += n
    return {key: RawTensor(header[key]["dtype"], header[key]["shape"], data, begin, end)
            for key, (begin, end) in spans.items()}, dict(metadata)


# -- writing ---------------------------------------------------------------------------------

def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise FormatError(f"safetensors metadata values must be strings; {bad[0]!r} is not")
    return {k: metadata[k] for k in sorted(metadata or {})}


def _header_bytes(header: dict[str, object]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: Union["Tensor", RawTensor]) -> memoryview | bytes:
    if isinstance(tensor, RawTensor):
        return tensor.data
    import torch

    data = tensor.detach().contiguous().cpu()
    if not data.numel():
        return b""
    return memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.dtype != torch.bool else data.numpy().tobytes()


def partial_path(path: Path) -> Path:
    """Where a file is staged before it is renamed onto `path`: beside it (the same file system, so the
    rename is atomic), unique to this writer, and ending in `.partial`, so one a killed process left is
    recognisable."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


class SafetensorsWriter:
    """Writes a safetensors file whose header is fixed up front; tensors then arrive one at a time,
    in the declared order, and go straight to disk. The file appears atomically on `close()`;
    `fsync=False` skips forcing it to disk, for files that are copied into the registry afterwards.
    A dtype is a torch dtype, or the torch name of a RawTensor's dtype for tensors written as RawTensors."""

    def __init__(self, path: Path, entries: Iterable[tuple[str, tuple[int, ...], Union["torch.dtype", str]]],
                 metadata: Mapping[str, str] | None = None, *, fsync: bool = True):
        self.path = Path(path)
        self._fsync = fsync
        self._order: list[tuple[str, tuple[int, ...], Union["torch.dtype", str], int]] = []
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = _checked_metadata(metadata)
        offset = 0
        for name, shape, dtype in entries:
            if name in header:
                raise FormatError(f"tensor {name} is declared twice in {self.path.name}")
            st = st_dtype(name, dtype)
            nbytes = math.prod(shape) * DTYPE_SIZES[st]
            header[name] = {"dtype": st, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own, so two processes writing the same file (a shared cache) never interleave.
        # (mkstemp would also make the file private to its owner.)
        self._tmp = partial_path(self.path)
        self._file = open(self._tmp, "xb")
        self._file.write(_header_bytes(header))
        self._next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._order):
            raise FormatError(f"tensor {name} was not declared in the header of {self.path.name}")
        want, shape, dtype, nbytes = self._order[self._next]
        if name != want:
            raise FormatError(f"tensor {name} written out of order: {want} comes next in {self.path.name}")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise FormatError(f"tensor {name} is {tensor.dtype}{list(tensor.shape)}, declared {dtype}{list(shape)}")
        self._file.write(_tensor_bytes(tensor))
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterable[Tensor]) -> None:
        """Write tensor `name` from row chunks (each already in the declared dtype)."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            raise FormatError(f"tensor {name} written out of order in {self.path.name}")
        _, _, dtype, nbytes = self._order[self._next]
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise FormatError(f"tensor {name}: chunk is {chunk.dtype}, declared {dtype}")
            self._file.write(_tensor_bytes(chunk))
            written += chunk.numel() * chunk.element_size()
        if written != nbytes:
            raise FormatError(f"tensor {name}: wrote {written} bytes, declared {nbytes}")
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            self.abort()
            raise FormatError(f"{self.path.name} is incomplete: tensor {missing} was never written")
        try:
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:  # a full disk at the last flush must not leave the partial file behind
            self.abort()
            raise
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


def write_safetensors(sd: Mapping[str, Union["Tensor", RawTensor]], path: Path, metadata: Mapping[str, str] | None = None,
                      *, fsync: bool = False) -> Path:
    """Write `sd` with a deterministic layout (tensors and metadata sorted by name), atomically."""
    keys = sorted(sd)
    with SafetensorsWriter(path, [(k, tuple(sd[k].shape), sd[k].dtype) for k in keys], metadata, fsync=fsync) as w:
        for k in keys:
            w.write(k, sd[k])
    return Path(path)


def safetensors_bytes(sd: Mapping[str, Union["Tensor", RawTensor]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes `write_safetensors` would write for `sd`: tensors and metadata sorted by name."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = _checked_metadata(metadata)
    chunks, offset = [], 0
    for name in sorted(sd):
        data = bytes(_tensor_bytes(sd[name]))
        header[name] = {"dtype": st_dtype(name, sd[name].dtype), "shape": list(sd[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return _header_bytes(header) + b"".join(chunks)
