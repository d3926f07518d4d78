"""Adapter file formats as plugins: the `AdapterFormat` record, its registry, and the entry points that
recognise an adapter by its contents and read or write it in any registered format.

Each format registers itself in its own module (`kohya.py`, `diffusers_lora.py`, `peft_folder.py`,
`canonical.py`, `slider_pt.py`) with `register_format`; a package adds one through the
`loraforge.formats` entry-point group, naming an `AdapterFormat` object. Detection asks every format
whether it claims the file; formats are written to claim disjoint files, so two claims are an error.

`read_adapter` gives torch tensors; `scan_adapter` gives the same state over the file's bytes
(`RawTensor`s, no torch) with the same checks, for commands that only check and store an adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.errors import FormatError, PluginError
from loraforge.formats import foreign_families
from loraforge.formats.lora import LoraState
from loraforge.formats.safetensors_io import RawTensor, all_finite, read_header, read_raw_safetensors, read_safetensors
from loraforge.plugins import FORMATS as FORMAT_GROUP

if TYPE_CHECKING:
    from torch import Tensor

ModuleNames = Mapping[str, Iterable[str]] | None


@dataclass(frozen=True)
class FileProbe:
    """What detection knows of a path before any format reads it."""

    path: Path
    container: str  # "folder", "safetensors" (header checked), "pickle" (torch zip or bare pickle) or "other"
    keys: tuple[str, ...] = ()  # sorted tensor names of a safetensors file
    metadata: Mapping[str, str] = field(default_factory=dict)  # its `__metadata__`


@dataclass(frozen=True)
class AdapterFormat:
    """A named adapter file format with its reader, writer and the test that recognises its files.

    `detect` returns whether the format reads the probed file; it may raise FormatError for a file
    that is clearly its own but unusable. A format without `detect` is written, never detected.
    `scan` reads like `read` but gives `RawTensor` factors (the file's bytes, no torch); a format
    without it (a torch pickle) is scanned by reading it with torch.
    """

    name: str
    description: str
    read: Callable[[Path, ModuleNames], tuple[LoraState, dict[str, str]]]
    write: Callable[[LoraState, Path, Mapping[str, str]], list[Path]]
    detect: Callable[[FileProbe], bool] | None = None
    scan: Callable[[Path, ModuleNames], tuple[LoraState, dict[str, str]]] | None = None
    # whether `write` spells LyCORIS variants (LoHa, LoKr, DoRA, ...), not only LoRA pairs: True for all of them,
    # or the names of the variants it spells (PEFT's use_dora spells `dora`)
    writes_variants: bool | frozenset[str] = False

    def __post_init__(self) -> None:
        # The plugin group describes a plugin by its docstring and names its source by its module, as
        # for a class; a format record takes both from what it is: its description and its reader.
        object.__setattr__(self, "__doc__", self.description)
        object.__setattr__(self, "__module__", getattr(self.read, "__module__", None) or type(self).__module__)


FORMAT_PLUGINS = FORMAT_GROUP  # the plugin group; FORMATS below is the read-only name -> format view


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Add `fmt` to the registry; a malformed or taken name is refused."""
    if not fmt.name.isidentifier() or fmt.name != fmt.name.lower():
        raise FormatError(f"adapter format name {fmt.name!r} must be a lower-case identifier")
    try:
        return FORMAT_PLUGINS.register(fmt.name, description=fmt.description)(fmt)
    except PluginError as e:  # a taken name: formats speak FormatError, like every other format failure
        raise FormatError(str(e)) from None


class _Formats(Mapping[str, AdapterFormat]):
    """The registered formats by name; reading it loads the built-ins and entry points first."""

    def _all(self) -> dict[str, AdapterFormat]:
        formats = {}
        for info in FORMAT_PLUGINS:
            fmt = info.obj
            if not isinstance(fmt, AdapterFormat) or fmt.name != info.name:
                raise FormatError(f"adapter format plugin {info.name!r} from {info.source} is not an AdapterFormat "
                                  f"named {info.name!r}; fix that package's loraforge.formats entry point")
            formats[info.name] = fmt
        return formats

    def __getitem__(self, name: str) -> AdapterFormat:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


FORMATS: Mapping[str, AdapterFormat] = _Formats()


def check_finite_tensors(sd: Mapping[str, Tensor | RawTensor]) -> None:
    """Raise FormatError naming the first key (as spelled in the file) holding NaN or Inf."""
    for key in sorted(sd):
        if not all_finite(sd[key]):
            raise FormatError(f"tensor {key} contains NaN or Inf values")


def read_finite_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors adapter file, refusing NaN or Inf under the file's own key."""
    sd, meta = read_safetensors(path)
    check_finite_tensors(sd)
    return sd, meta


def scan_finite_safetensors(path: Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """`read_finite_safetensors` as RawTensors: one read of the file, no torch."""
    sd, meta = read_raw_safetensors(path)
    check_finite_tensors(sd)
    return sd, meta


# -- detection and the public entry points ---------------------------------------------------

def probe(path: Path) -> FileProbe:
    """The container of `path` and, for safetensors, its checked header."""
    if path.is_dir():
        return FileProbe(path, "folder")
    with open(path, "rb") as f:
        head = f.read(9)
    # Safetensors first: its 8-byte length field can begin with any byte (0x80 for a header of
    # 0x480 bytes), so only a JSON object after it tells; read_header then checks every offset.
    if head[8:9] == b"{":
        header, metadata = read_header(path)
        return FileProbe(path, "safetensors", tuple(sorted(header)), metadata)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive or a bare pickle
        if path.suffix.lower() == ".safetensors":
            raise FormatError(f"{path} is a torch pickle named .safetensors; rename it to "
                              f"{path.with_suffix('.pt').name} to import it as a .pt file")
        return FileProbe(path, "pickle")
    return FileProbe(path, "other")


def detect_format(path: Path) -> str:
    """The name of the one registered format that claims the file or folder, judged by its contents."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    found = probe(path)
    if found.container == "safetensors":
        foreign = foreign_families.refusal(str(path), found.keys)
        if foreign:
            raise FormatError(foreign)
    claims = sorted(name for name, fmt in FORMATS.items() if fmt.detect is not None and fmt.detect(found))
    if len(claims) > 1:
        raise FormatError(f"{path} is claimed by several adapter formats ({', '.join(claims)}); "
                          "uninstall the plugin that should not read it")
    if claims:
        return claims[0]
    if found.container == "folder":
        raise FormatError(_unknown_folder(path))
    if found.container == "safetensors":
        if not found.keys:
            raise FormatError(f"{path} holds no tensors: the adapter is empty")
        raise FormatError(unknown_layout(found))
    raise FormatError(f"{path} is neither a safetensors file nor a torch .pt file")


def _unknown_folder(path: Path) -> str:
    """Why a folder is no adapter, pointing at what in it might be one (PEFT's per-adapter subfolders,
    a Hub repo's weights file) rather than picking it."""
    adapters = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
    if adapters:
        return (f"{path} holds PEFT adapter folders ({', '.join(adapters[:4])}), not one adapter; "
                f"pass one of them, e.g. {path / adapters[0]}")
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if files:
        return f"{path} is a folder, not an adapter file or PEFT folder; pass the file in it, e.g. {path / files[0]}"
    return f"{path} is a folder but not a PEFT adapter folder (no adapter_config.json)"


def _claims_key(fmt: AdapterFormat, found: FileProbe, key: str) -> bool:
    """Whether `fmt` would read a file holding only `key` (a format that objects to the key knows it too)."""
    try:
        return bool(fmt.detect(FileProbe(found.path, found.container, (key,), found.metadata)))
    except FormatError:
        return True


def _embedding_layout(keys: tuple[str, ...]) -> str | None:
    """What kind of textual-inversion embedding file `keys` spell, if they spell one: A1111's `emb_params`,
    SDXL's `clip_l` + `clip_g`, or diffusers' one tensor per placeholder token (keys without a dot)."""
    if "emb_params" in keys:
        return "a textual-inversion embedding (A1111 key emb_params)"
    if {"clip_g", "clip_l"} <= set(keys):
        return "an SDXL textual-inversion embedding (keys clip_g, clip_l)"
    if keys and all("." not in k for k in keys):
        return f"a textual-inversion embedding (one vector per token: {', '.join(keys[:3])})"
    return None


def unknown_layout(found: FileProbe) -> str:
    """Why no format claims a safetensors file: the first key no format knows, or the formats its keys mix."""
    detecting = {name: fmt for name, fmt in sorted(FORMATS.items()) if fmt.detect is not None}
    known = ", ".join(detecting)
    embedding = _embedding_layout(found.keys)
    if embedding:
        return (f"{found.path} is {embedding}, not a LoRA adapter: import it with --kind embedding (adapter "
                f"formats: {known})")
    first_of: dict[str, str] = {}
    for key in found.keys:
        owners = [name for name, fmt in detecting.items() if _claims_key(fmt, found, key)]
        if not owners:
            return (f"{found.path} is not a LoRA adapter in a known format (first unknown key: {key}); "
                    f"known: {known}")
        for name in owners:
            first_of.setdefault(name, key)
    mixed = "; ".join(f"{name}: {key}" for name, key in sorted(first_of.items(), key=lambda item: item[1]))
    return (f"{found.path} mixes the keys of several adapter formats ({mixed}); "
            f"split it into one file per format (known: {known})")


def read_adapter(path: Path, module_names: ModuleNames = None) -> tuple[LoraState, str, dict[str, str]]:
    """(state, detected format, safetensors header metadata) of an adapter file or folder."""
    return _read_adapter(path, module_names, scan=False)


def scan_adapter(path: Path, module_names: ModuleNames = None) -> tuple[LoraState, str, dict[str, str]]:
    """`read_adapter` with the factors as `RawTensor`s where the format can scan (no torch), after the
    same checks; what it gives can be summarised, checked and written as safetensors, not computed with."""
    return _read_adapter(path, module_names, scan=True)


def _read_adapter(path: Path, module_names: ModuleNames, scan: bool) -> tuple[LoraState, str, dict[str, str]]:
    path = Path(path)
    fmt = detect_format(path)
    adapter_format = FORMATS[fmt]
    reader = adapter_format.scan if scan and adapter_format.scan is not None else adapter_format.read
    try:
        state, metadata = reader(path, module_names)
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
    spelled = FORMATS[fmt].writes_variants
    unspelled = {v: n for v, n in state.variants.items() if v != "lora" and not (spelled is True or v in (spelled or ()))}
    if unspelled:
        variants = ", ".join(f"{n} {v}" for v, n in unspelled.items())
        writers = ", ".join(sorted(n for n, f in FORMATS.items()
                                   if f.writes_variants is True or set(unspelled) <= set(f.writes_variants or ())))
        raise FormatError(f"the adapter holds LyCORIS modules ({variants}), which the {fmt} format cannot spell; "
                          f"export it as {writers}, or convert it to LoRA pairs first (lora resize --rank R)")
    return FORMATS[fmt].write(state, Path(path), dict(metadata or {}))
