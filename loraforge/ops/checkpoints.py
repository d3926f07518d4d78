"""Opened checkpoints: single-file (A1111 prefixes, `.safetensors` or pickled `.ckpt`/`.pt`) or diffusers
folders, read tensor by tensor.

Every tensor has a *checkpoint key*: the key itself in a single file, `component/key` in a folder,
so two inputs of the same layout are compared and merged key by key. A single file's tensors are tied to
diffusers names by `keymap_of` (diffusers' own converters, see models.single_file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraforge.errors import ConfigError, MergeError
from loraforge.formats.safetensors_io import TensorFile, TensorInfo, st_dtype
from loraforge.ops.views import CheckpointView

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.": "text_encoder",
    "conditioner.": "text_encoder",
}
FOLDER_COMPONENTS = {"unet": "unet", "transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder",
                     "text_encoder_2": "text_encoder"}
UNET_PREFIX = "model.diffusion_model."


def component_of(ckey: str, layout: str, family: Optional[str] = None) -> str:
    """unet / transformer / text_encoder / vae / other for a checkpoint key (a Flux single file in Black Forest
    Labs' layout holds the transformer alone: its other tensors, if any, are "other")."""
    if layout == "diffusers":
        return FOLDER_COMPONENTS.get(ckey.split("/", 1)[0], "other")
    if family == "flux":
        from loraforge.models.flux_single_file import bfl_transformer_key

        return "transformer" if bfl_transformer_key(ckey) is not None else "other"
    for prefix, component in SINGLE_FILE_PREFIXES.items():
        if ckey.startswith(prefix):
            return component
    return "other"


def denoiser_key(ckey: str, layout: str, family: Optional[str] = None) -> Optional[str]:
    """The key inside the denoiser (UNet or Flux transformer, without prefix or folder), or None for other
    components."""
    if layout == "diffusers":
        folder, _, key = ckey.partition("/")
        return key if folder in ("unet", "transformer") else None
    if family == "flux":
        from loraforge.models.flux_single_file import bfl_transformer_key

        return bfl_transformer_key(ckey)
    return ckey[len(UNET_PREFIX):] if ckey.startswith(UNET_PREFIX) else None


@dataclass
class Checkpoint:
    """A checkpoint opened for streamed reads."""

    ref: str
    path: Path
    layout: str  # "diffusers" | "single_file"
    family: str
    digest: Optional[str]  # None until asked for: see ops.merge.digest_of_input
    files: dict[str, TensorFile] = field(default_factory=dict)  # relative path → reader
    index: dict[str, tuple[str, str]] = field(default_factory=dict)  # ckey → (relative path, key in file)

    @classmethod
    def open(cls, base) -> "Checkpoint":
        """Open a `BaseModel` (see `registry.resolve.resolve_base`)."""
        ckpt = cls(ref=base.ref, path=Path(base.path), layout=base.layout, family=base.family, digest=base.digest)
        if base.layout == "diffusers":
            for sub in sorted(p for p in ckpt.path.iterdir() if p.is_dir()):
                for f in sorted(sub.glob("*.safetensors")):
                    if f.name.count(".") > 1:  # variants such as model.fp16.safetensors duplicate the weights
                        continue
                    ckpt._add(f.relative_to(ckpt.path).as_posix(), f, prefix=sub.name + "/")
        elif ckpt.path.suffix.lower() in PICKLE_SUFFIXES:
            reader = PickleFile(ckpt.path)
            ckpt.files[ckpt.path.name] = reader
            ckpt.index.update({key: (ckpt.path.name, key) for key in reader.entries})
        else:
            if ckpt.path.suffix.lower() != ".safetensors":
                raise ConfigError(f"{base.ref}: {ckpt.path.name} is neither .safetensors nor a torch pickle "
                                  f"({', '.join(PICKLE_SUFFIXES)})")
            ckpt._add(ckpt.path.name, ckpt.path, prefix="")
        if not ckpt.index:
            raise MergeError(f"{base.ref} holds no safetensors weights")
        return ckpt

    def _add(self, rel: str, path: Path, prefix: str) -> None:
        reader = TensorFile(path)
        self.files[rel] = reader
        for key in reader.entries:
            self.index[prefix + key] = (rel, key)

    def close(self) -> None:
        for reader in self.files.values():
            reader.close()

    def info(self, ckey: str) -> TensorInfo:
        rel, key = self.index[ckey]
        return self.files[rel].entries[key]

    def get(self, ckey: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        rel, key = self.index[ckey]
        return self.files[rel].get(key, rows)

    def read_into(self, ckey: str, buffer: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Read tensor `ckey` (or a row range) into the flat `buffer`; see `TensorFile.read_into`."""
        rel, key = self.index[ckey]
        return self.files[rel].read_into(key, buffer, rows)

    def span(self, ckey: str, rows: Optional[tuple[int, int]] = None) -> tuple[int, int, list[int]]:
        """(first byte, byte count, shape) of tensor `ckey` or a row range of it; see `TensorFile.span`."""
        rel, key = self.index[ckey]
        return self.files[rel].span(key, rows)

    def component(self, ckey: str) -> str:
        return component_of(ckey, self.layout, self.family)

    def file_layout(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """[(relative file, [(ckey, key in file) in file order])] — the shape of an output mirroring this input."""
        out: dict[str, list[tuple[str, str]]] = {rel: [] for rel in self.files}
        for ckey, (rel, key) in self.index.items():
            out[rel].append((ckey, key))
        return [(rel, sorted(keys, key=lambda k: self.files[rel].entries[k[1]].begin)) for rel, keys in out.items()]


def check_compatible(first: Checkpoint, other: Checkpoint, components: set[str]) -> None:
    """Raise MergeError naming the first tensor that differs in presence or shape (in `components`); a key of
    `first` that a converted `other` has no counterpart for (`untranslated`, see `ConvertedCheckpoint`) is
    not asked for."""
    check_same_family(first, other)
    if first.layout != other.layout:
        raise MergeError(f"{first.ref} is a {first.layout.replace('_', '-')} checkpoint and {other.ref} a "
                         f"{other.layout.replace('_', '-')} one: give all inputs in the same layout")
    lacking = sorted(({first.component(k) for k in first.index} & components)
                     - {other.component(k) for k in other.index})
    if lacking:
        alone = " (a Flux single file holds the transformer alone)" if other.family == "flux" else ""
        raise MergeError(f"{other.ref} holds no {lacking[0]} weights{alone}: leave {lacking[0]} out of the merged "
                         "components (--include)")
    untranslated = getattr(other, "untranslated", frozenset())
    for ckey in first.index:
        if first.component(ckey) not in components or ckey in untranslated:
            continue
        if ckey not in other.index:
            raise MergeError(f"tensor {ckey} of {first.ref} is missing from {other.ref}: the checkpoints "
                             "are different architectures (or exclude that component)")
        a, b = first.info(ckey), other.info(ckey)
        if a.shape != b.shape:
            raise MergeError(f"tensor {ckey} has shape {list(a.shape)} in {first.ref} but {list(b.shape)} in "
                             f"{other.ref}: the checkpoints are different architectures")
        if a.is_float != b.is_float:
            raise MergeError(f"tensor {ckey} is {a.dtype} in {first.ref} but {b.dtype} in {other.ref}")
    for ckey in other.index:
        if other.component(ckey) in components and ckey not in first.index:
            raise MergeError(f"tensor {ckey} of {other.ref} is missing from {first.ref}: the checkpoints "
                             "are different architectures")


def check_same_family(first: Checkpoint, other: Checkpoint) -> None:
    """Refuse, in one line naming both families, checkpoints of different model families."""
    if first.family != other.family:
        from loraforge.families import describe

        def a(name: str) -> str:
            label = describe(name)
            return ("an " if label[:1] in "AEIOSX" else "a ") + label

        raise MergeError(f"{other.ref} is {a(other.family)} checkpoint but {first.ref} is {a(first.family)} one: "
                         "checkpoints of different architectures cannot be merged")


class PickleFile:
    """A pickled state dict (`.ckpt`/`.pt`, optionally under "state_dict") read with weights_only=True and
    memory-mapped where torch can (zip checkpoints), behind the reads `TensorFile` offers."""

    def __init__(self, path: Path):
        from loraforge.models.base import pickle_tensors

        self.path = Path(path)
        self._tensors = pickle_tensors(self.path)  # the load the base's family check made, when it made one
        self.entries: dict[str, TensorInfo] = {}
        offset = 0
        for key, t in self._tensors.items():
            n = t.numel() * t.element_size()
            self.entries[key] = TensorInfo(st_dtype(key, t.dtype), tuple(t.shape), offset, offset + n)
            offset += n

    def close(self) -> None:
        self._tensors = {}

    def keys(self) -> list[str]:
        return list(self.entries)

    def span(self, key: str, rows: Optional[tuple[int, int]] = None) -> tuple[int, int, list[int]]:
        return TensorFile.span(self, key, rows)  # same arithmetic over the offsets given in __init__

    def get(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        t = self._tensors[key]
        return (t[rows[0]:rows[1]] if rows is not None and t.dim() else t).clone()

    def read_into(self, key: str, buffer: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        t = self._tensors[key]
        t = t[rows[0]:rows[1]] if rows is not None and t.dim() else t
        out = buffer.view(torch.uint8)[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        return out.copy_(t)


def single_file_configs_folder(base, home: Optional[Path] = None, config: Optional[Path] = None) -> Path:
    """The diffusers folder whose configs map single-file checkpoint `base` (a `BaseModel`): `config`, the base's
    own --config, or the builtin model of its architecture; refused in one line when none is known."""
    from loraforge.models.pipeline import single_file_configs

    folder = Path(config) if config is not None else single_file_configs(base, home)
    if folder is None:
        raise ConfigError(f"{base.ref}: the configs of this {base.family} single file's architecture are not known; "
                          "pass --config DIR, a diffusers folder of the same architecture")
    return folder


def keymap_of(ckpt: Checkpoint, configs: Path):
    """The KeyMap of opened single-file checkpoint `ckpt` under the configs of diffusers folder `configs`."""
    from loraforge.models.single_file import KeyMap, configs_from_folder

    return KeyMap.build({k: ckpt.info(k).shape for k in ckpt.index}, ckpt.family,
                        configs_from_folder(Path(configs), ckpt.family))


# ---- one checkpoint read in another layout ----------------------------------------------------------

class ConvertedCheckpoint(CheckpointView):
    """Checkpoint `source` read in the other layout through the KeyMap of a single file (diffusers' own
    converters, see models.single_file): a single file seen as a diffusers folder (`component/key` keys), or a
    diffusers folder seen as the single file the KeyMap describes. It offers the reads merges and extracts make
    (`info`, `get`, `read_into`, `span`). A tensor that is a plain rename streams row ranges from the source;
    one made through views (fused q/k/v, 1x1-conv attention) is assembled once and kept until another is asked for.

    `untranslated`: keys of the other layout this view has no counterpart for because diffusers' converters drop
    them (position ids, logit scales); the caller takes them from the checkpoint whose layout they are."""

    def __init__(self, source: Checkpoint, layout: str, sources: dict, infos: dict[str, TensorInfo],
                 assemble, untranslated: frozenset = frozenset()):
        self.source, self.layout = source, layout
        self.index = sources  # ckey → [(source ckey, Piece)]
        self._infos, self._assemble = infos, assemble
        self.untranslated = untranslated
        self._last: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    @classmethod
    def as_diffusers(cls, single: Checkpoint, keymap, spelling: Optional[Checkpoint] = None) -> "ConvertedCheckpoint":
        """Single file `single` as a diffusers folder; text-encoder keys spelled as `spelling` (a folder) has them."""
        from loraforge.models.single_file import DROPPED_BY_CONVERTERS, match_folder_key

        folder_keys: dict[str, set[str]] = {}
        for ckey in (spelling.index if spelling is not None else ()):
            component, _, key = ckey.partition("/")
            folder_keys.setdefault(component, set()).add(key)
        spelled = match_folder_key(keymap, folder_keys)
        sources, infos = {}, {}
        for key in single.index:
            dtype = single.info(key).dtype
            for piece in keymap.pieces.get(key, []):
                ckey = f"{piece.component}/{spelled[(piece.component, piece.key)]}"
                if spelling is not None and ckey not in spelling.index and ckey.endswith(DROPPED_BY_CONVERTERS):
                    continue  # a buffer the folder's models rebuild themselves (position ids)
                sources[ckey] = [(key, piece)]
                infos[ckey] = TensorInfo(dtype, piece.shape, 0, 0)

        def assemble(ckey, parts):
            (key, piece), = parts
            return piece.view_of(single.get(key))

        untranslated = frozenset(k for k in (spelling.index if spelling is not None else ())
                                 if k not in sources and k.endswith(DROPPED_BY_CONVERTERS))
        return cls(single, "diffusers", sources, infos, assemble, untranslated)

    @classmethod
    def as_single_file(cls, folder: Checkpoint, keymap) -> "ConvertedCheckpoint":
        """Diffusers folder `folder` as the single file `keymap` describes (only keys whose pieces it holds)."""
        from loraforge.models.single_file import DROPPED_BY_CONVERTERS, match_folder_key

        folder_keys: dict[str, set[str]] = {}
        for ckey in folder.index:
            component, _, key = ckey.partition("/")
            folder_keys.setdefault(component, set()).add(key)
        spelled = match_folder_key(keymap, folder_keys)
        sources, infos = {}, {}
        for key, shape in keymap.shapes.items():
            pieces = [(f"{p.component}/{spelled[(p.component, p.key)]}", p) for p in keymap.pieces.get(key, [])]
            if pieces and all(ckey in folder.index for ckey, _ in pieces):
                sources[key] = pieces
                infos[key] = TensorInfo(folder.info(pieces[0][0]).dtype, tuple(shape), 0, 0)
        lookup = {(p.component, p.key): ckey for parts in sources.values() for ckey, p in parts}

        def assemble(key, parts):
            return keymap.from_diffusers(key, lambda p: folder.get(lookup[(p.component, p.key)]),
                                         dtype=infos[key].torch_dtype)

        untranslated = frozenset(k for k in keymap.shapes if k not in sources and k.endswith(DROPPED_BY_CONVERTERS))
        return cls(folder, "single_file", sources, infos, assemble, untranslated)

    def close(self) -> None:
        self._last = (None, None)
        self.source.close()

    def component(self, ckey: str) -> str:
        return component_of(ckey, self.layout, self.family)

    def get(self, ckey: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        parts = self.index[ckey]
        if len(parts) == 1 and not parts[0][1].ops:  # a rename: the source's own (row) reads
            return self.source.get(parts[0][0], rows)
        if self._last[0] != ckey:
            self._last = (None, None)  # the previous tensor is released before the next is made
            self._last = (ckey, self._assemble(ckey, parts).contiguous())
        tensor = self._last[1]
        return (tensor[rows[0]:rows[1]] if rows is not None and tensor.dim() else tensor).clone()

    def read_into(self, ckey: str, buffer: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        parts = self.index[ckey]
        if len(parts) == 1 and not parts[0][1].ops:
            return self.source.read_into(parts[0][0], buffer, rows)
        t = self.get(ckey, rows)
        out = buffer.view(torch.uint8)[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        return out.copy_(t)


def in_layout_of(first: Checkpoint, other: Checkpoint):
    """`other` read in `first`'s layout: itself when they share it, else converted through the KeyMap of
    whichever is the single file, with the diffusers folder's configs (diffusers' converters need them)."""
    check_same_family(first, other)
    if first.family == "flux":
        from loraforge.ops.flux_layouts import flux_in_layout_of

        return flux_in_layout_of(first, other)
    if other.layout == first.layout:
        return other
    if first.layout == "diffusers":
        return ConvertedCheckpoint.as_diffusers(other, keymap_of(other, first.path), spelling=first)
    return ConvertedCheckpoint.as_single_file(other, keymap_of(first, other.path))
