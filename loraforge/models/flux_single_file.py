"""Black Forest Labs' Flux single files (`flux1-dev.safetensors`: the transformer alone, `double_blocks.N.…`,
`single_blocks.N.…`, optionally under `model.diffusion_model.`) ⇄ diffusers' FluxTransformer2DModel state dicts,
weights and biases, through the one module table of `loraforge.formats.flux_names`.

Every tensor of one layout is rows of tensors of the other, concatenated: a rename is all rows of one tensor,
a diffusers `to_q` is a row range of BFL's fused `qkv` (or `linear1`), a fused BFL tensor is its diffusers
pieces one after the other, and the final adaLN's (shift, scale) ⇄ (scale, shift) is the two halves of one
tensor in the other order. A `RowPlan` says which; a reader can then stream any row range of a converted
tensor straight from the source's rows (ops.flux_layouts), and `bfl_to_diffusers` / `diffusers_to_bfl` are
the whole-state-dict conversions built on the same plans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from loraforge.errors import ConfigError, FormatError
from loraforge.formats.flux_names import BFL_WRAPPERS, FluxModule, module_table

# The first name of every BFL transformer tensor (after a wrapper); anything else in a single file is not Flux's.
BFL_ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
             "final_layer")
# BFL's RMSNorm weights are `scale`; diffusers' are `weight`.
_PARAMS = {"weight": "weight", "bias": "bias", "scale": "weight"}


@dataclass(frozen=True)
class Segment:
    """Rows `start:stop` of source tensor `key`."""

    key: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RowPlan:
    """A tensor of the target layout: the rows of `segments` concatenated, of shape `shape`."""

    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def is_rename(self) -> bool:
        """All rows of one source tensor in order (the target can be read as the source itself)."""
        (seg, *rest) = self.segments
        return not rest and seg.start == 0 and seg.stop == (self.shape[0] if self.shape else 1)

    def pieces(self, rows: Optional[tuple[int, int]] = None) -> list[tuple[Segment, int]]:
        """The source rows holding target rows `rows` (all when None): (source segment, first target row)."""
        if not self.shape:
            return [(self.segments[0], 0)]
        lo, hi = rows if rows is not None else (0, self.shape[0])
        out, at = [], 0
        for seg in self.segments:
            a, b = max(lo, at), min(hi, at + seg.rows)
            if a < b:
                out.append((Segment(seg.key, seg.start + a - at, seg.start + b - at), a - lo))
            at += seg.rows
        return out


def bfl_wrapper(keys) -> str:
    """The prefix a single file wraps BFL names in (`model.diffusion_model.`, `diffusion_model.`) or ""."""
    for key in keys:
        for wrapper in BFL_WRAPPERS:
            if key.startswith(wrapper) and key[len(wrapper):].split(".", 1)[0] in BFL_ROOTS:
                return wrapper
    return ""


def is_bfl_key(key: str, wrapper: str = "") -> bool:
    """Whether single-file tensor `key` belongs to a Flux transformer in BFL names (under `wrapper`)."""
    return key.startswith(wrapper) and key[len(wrapper):].split(".", 1)[0] in BFL_ROOTS


def bfl_transformer_key(key: str) -> Optional[str]:
    """Single-file tensor `key` without its wrapper when it is a Flux transformer's in BFL names, else None."""
    for wrapper in ("", *BFL_WRAPPERS):
        if is_bfl_key(key, wrapper):
            return key[len(wrapper):]
    return None


def _split(module: FluxModule, rows: int, hidden: int) -> list[int]:
    sizes = module.split_sizes(rows, hidden)
    if sum(sizes) != rows or min(sizes) <= 0:
        raise FormatError(f"{module.bfl} has {rows} rows, which do not split into {len(module.diffusers)} parts of "
                          f"a {hidden}-wide Flux transformer: the file is not a Flux transformer")
    return sizes


def _hidden(bfl_shapes: Mapping[str, tuple[int, ...]], wrapper: str) -> int:
    """The model width: rows of `img_in` (BFL's x embedder), which every Flux transformer has."""
    shape = bfl_shapes.get(f"{wrapper}img_in.weight")
    if not shape:
        raise FormatError(f"the file has no {wrapper}img_in.weight: it is not a Black Forest Labs Flux transformer")
    return int(shape[0])


def _halves(key: str, rows: int) -> tuple[Segment, ...]:
    half = rows // 2
    return Segment(key, half, rows), Segment(key, 0, half)


def diffusers_plans(bfl_shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, RowPlan], list[str]]:
    """({diffusers transformer key: its rows in BFL tensors}, BFL keys of the transformer the table does not
    know) for a single file's {key: shape} (any wrapper; keys outside the transformer are ignored)."""
    wrapper = bfl_wrapper(bfl_shapes)
    keys = [k for k in bfl_shapes if is_bfl_key(k, wrapper)]
    table = module_table([k[len(wrapper):] for k in keys])
    hidden = _hidden(bfl_shapes, wrapper)
    plans: dict[str, RowPlan] = {}
    unknown = []
    for key in keys:
        module_name, _, param = key[len(wrapper):].rpartition(".")
        module = table.get(module_name)
        if module is None or param not in _PARAMS or (param == "scale") != module.norm:
            unknown.append(key)
            continue
        shape = tuple(bfl_shapes[key])
        rows = shape[0] if shape else 1
        suffix = _PARAMS[param]
        if module.swap_halves:
            plans[f"{module.diffusers[0]}.{suffix}"] = RowPlan(shape, _halves(key, rows))
            continue
        at = 0
        for name, size in zip(module.diffusers, _split(module, rows, hidden)):
            plans[f"{name}.{suffix}"] = RowPlan((size, *shape[1:]), (Segment(key, at, at + size),))
            at += size
    return plans, unknown


def bfl_plans(diffusers_shapes: Mapping[str, tuple[int, ...]], wrapper: str = "") -> tuple[dict[str, RowPlan], list[str]]:
    """({BFL key under `wrapper`: its rows in diffusers tensors}, diffusers keys the table does not know) for a
    diffusers transformer's {key: shape}. A fused BFL tensor is made only when all of its pieces are there."""
    table = module_table(list(diffusers_shapes))
    where: dict[str, tuple[FluxModule, int]] = {d: (m, i) for m in table.values() for i, d in enumerate(m.diffusers)}
    plans: dict[str, RowPlan] = {}
    unknown, done = [], set()
    for key in diffusers_shapes:
        name, _, suffix = key.rpartition(".")
        if name not in where or suffix not in ("weight", "bias"):
            unknown.append(key)
            continue
        module, _ = where[name]
        param = "scale" if module.norm and suffix == "weight" else suffix
        if module.norm and suffix != "weight":
            unknown.append(key)
            continue
        target = f"{wrapper}{module.bfl}.{param}"
        if target in done:
            continue
        done.add(target)
        parts = [f"{d}.{suffix}" for d in module.diffusers]
        missing = [p for p in parts if p not in diffusers_shapes]
        if missing:
            raise FormatError(f"the transformer has {key} but not {missing[0]}, which BFL's {module.bfl} fuses with it")
        shapes = [tuple(diffusers_shapes[p]) for p in parts]
        rows = [s[0] if s else 1 for s in shapes]
        shape = (sum(rows), *shapes[0][1:])
        if module.swap_halves:
            plans[target] = RowPlan(shape, _halves(parts[0], rows[0]))
        else:
            plans[target] = RowPlan(shape, tuple(Segment(p, 0, r) for p, r in zip(parts, rows)))
    return plans, unknown


def assemble(plan: RowPlan, get: Callable[[str, tuple[int, int]], "object"]):
    """The target tensor of `plan`; `get(key, (start, stop))` gives rows of a source tensor."""
    import torch

    parts = [get(seg.key, (seg.start, seg.stop)) for seg, _ in plan.pieces()]
    if not plan.shape:
        return parts[0].reshape(())
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


@dataclass(frozen=True)
class FluxPiece:
    """One diffusers transformer tensor inside one BFL tensor: the rows `plan` names, in diffusers' order (a
    `to_k` is a row range of `qkv`, `norm_out.linear` the two halves of the final adaLN swapped)."""

    key: str
    plan: RowPlan
    component: str = "transformer"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.plan.shape

    def read_from(self, tensor):
        """This diffusers tensor, copied out of BFL tensor `tensor`."""
        return assemble(self.plan, lambda _k, r: _rows(tensor, r))

    def write_into(self, tensor, value) -> None:
        """Put diffusers tensor `value` in its rows of BFL tensor `tensor` (in place)."""
        if not self.plan.shape:
            tensor.copy_(value.reshape(tensor.shape))
            return
        for seg, at in self.plan.pieces():
            tensor[seg.start:seg.stop].copy_(value[at:at + seg.rows])


@dataclass
class BflKeyMap:
    """How a BFL single file's tensors hold diffusers' transformer tensors, read from its {key: shape} alone:
    single-file key → its pieces (the same reads `models.single_file.KeyMap` offers for SD single files)."""

    shapes: dict[str, tuple[int, ...]]
    pieces: dict[str, list[FluxPiece]]

    @classmethod
    def build(cls, bfl_shapes: Mapping[str, tuple[int, ...]], what: str = "the single file") -> "BflKeyMap":
        plans, unknown = diffusers_plans(bfl_shapes)
        _refuse_unknown(unknown, what)
        pieces: dict[str, list[FluxPiece]] = {}
        for key, plan in plans.items():
            pieces.setdefault(plan.segments[0].key, []).append(FluxPiece(key, plan))
        return cls(dict(bfl_shapes), pieces)


def _refuse_unknown(unknown: list[str], what: str) -> None:
    if unknown:
        raise FormatError(f"{what} has {unknown[0]}, which is no Flux transformer tensor loraforge knows "
                          f"({len(unknown)} such): it is not a FLUX.1 transformer")


def _rows(tensor, rows):
    return tensor[rows[0]:rows[1]] if tensor.dim() else tensor


def bfl_to_diffusers(state: Mapping[str, "object"]) -> dict:
    """diffusers' FluxTransformer2DModel state dict of BFL transformer `state` (any wrapper); a transformer
    tensor the table does not know is refused in one line, tensors of other models (a VAE) are left out."""
    plans, unknown = diffusers_plans({k: tuple(v.shape) for k, v in state.items()})
    _refuse_unknown(unknown, "the single file")
    return {key: assemble(plan, lambda k, r: _rows(state[k], r)) for key, plan in plans.items()}


def diffusers_to_bfl(state: Mapping[str, "object"], wrapper: str = "") -> dict:
    """The BFL single-file state dict (names under `wrapper`) of diffusers Flux transformer `state`."""
    plans, unknown = bfl_plans({k: tuple(v.shape) for k, v in state.items()}, wrapper)
    _refuse_unknown(unknown, "the transformer")
    return {key: assemble(plan, lambda k, r: _rows(state[k], r)) for key, plan in plans.items()}


# ---- files --------------------------------------------------------------------------------------------------

def write_bfl_file(folder: Path, out: Path, wrapper: str = "") -> Path:
    """The transformer of diffusers Flux folder `folder` written as a BFL single file at `out`, one tensor at a
    time, each in its dtype."""
    from loraforge.formats.safetensors_io import SafetensorsWriter, TensorFile

    files = [f for f in sorted((Path(folder) / "transformer").glob("*.safetensors")) if f.name.count(".") == 1]
    if not files:
        raise ConfigError(f"{folder} has no transformer weights: it is not a diffusers Flux folder")
    readers = [TensorFile(f) for f in files]
    try:
        where = {k: r for r in readers for k in r.entries}
        plans, unknown = bfl_plans({k: r.entries[k].shape for k, r in where.items()}, wrapper)
        _refuse_unknown(unknown, f"{folder}/transformer")
        dtype = {k: where[p.segments[0].key].entries[p.segments[0].key].torch_dtype for k, p in plans.items()}
        with SafetensorsWriter(Path(out), [(k, p.shape, dtype[k]) for k, p in plans.items()], {"format": "pt"}) as w:
            for key, plan in plans.items():
                w.write(key, assemble(plan, lambda k, r: where[k].get(k, r)))
    finally:
        for reader in readers:
            reader.close()
    return Path(out)


def read_transformer_state(path: Path, dtype=None) -> dict:
    """diffusers transformer state dict of BFL single file `path`, read one tensor at a time (in `dtype`)."""
    from loraforge.formats.safetensors_io import TensorFile

    if Path(path).suffix.lower() != ".safetensors":
        raise ConfigError(f"{Path(path).name}: Flux single files are read from .safetensors; convert the pickle first")
    with TensorFile(path) as f:
        plans, unknown = diffusers_plans({k: e.shape for k, e in f.entries.items()})
        _refuse_unknown(unknown, Path(path).name)

        def get(k, r):
            t = f.get(k, r if f.entries[k].shape else None)
            return t if dtype is None else t.to(dtype)

        return {key: assemble(plan, get) for key, plan in plans.items()}


def transformer_config(folder: Path) -> dict:
    path = Path(folder) / "transformer" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); --config must be a diffusers Flux folder") from None


def architecture_problem(single_file: Path, folder: Path) -> Optional[str]:
    """None when BFL file `single_file` converts to exactly the transformer the configs of Flux folder `folder`
    build (every tensor, by shape; only headers are read), else the first difference, in words."""
    import torch
    from diffusers import FluxTransformer2DModel

    from loraforge.models.base import checkpoint_shapes

    try:
        plans, unknown = diffusers_plans(checkpoint_shapes(single_file))
    except FormatError as exc:
        return str(exc)
    if unknown:
        return f"the file's {unknown[0]} is no Flux transformer tensor"
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(transformer_config(folder))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(want):
        if key not in plans:
            return f"the folder's transformer.{key} is missing from the file"
        if plans[key].shape != want[key]:
            return (f"transformer.{key} is {'x'.join(map(str, plans[key].shape))} in the file but "
                    f"{'x'.join(map(str, want[key]))} in the folder")
    extra = sorted(set(plans) - set(want))
    if extra:
        return f"the file has transformer.{extra[0]}, which the folder lacks"
    return None


def load_transformer(single_file: Path, folder: Path, dtype):
    """diffusers' FluxTransformer2DModel of the configs in `folder`, with the weights of BFL file `single_file`
    (converted here, loaded strictly; built on the meta device so no second copy is allocated)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(transformer_config(folder))
    state = read_transformer_state(single_file, dtype)
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        which = f"lacks transformer.{missing[0]}" if missing else f"has transformer.{extra[0]}, unknown to it"
        raise FormatError(f"{Path(single_file).name} does not load into the transformer configs of {folder}: "
                          f"the file {which}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
