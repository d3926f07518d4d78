"""LoRA pairs on Black Forest Labs' fused Flux modules ⇄ pairs on the diffusers modules they stack, exact in ΔW.

BFL-named files (kohya's `lora_unet_double_blocks_…`, BFL/ComfyUI's `diffusion_model.double_blocks.…`, XLabs)
adapt a double block's `img_attn.qkv` and a single block's `linear1` as one weight; diffusers has a module per
row block (`flux_names`). Splitting a pair (down r×n, up R×r) on a fused weight gives each diffusers module the
same `down` and its rows of `up`: ΔW split by rows, exact, the scale unchanged. Fusing back: parts with one
shared `down` and one scale are one pair with their `up`s stacked; parts with their own downs are one pair of
rank Σr, the downs stacked and `up` block-diagonal, alpha set so every part keeps its scale (the scales baked
into `up` where they differ). A row block the adapter leaves out is zero rows of ΔW. The final layer's
modulation swaps its (shift, scale) halves both ways.

Splitting also works on `RawTensor`s (row views of the file's bytes), so an import needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loraforge.errors import FormatError
from loraforge.formats.flux_names import MLP_RATIO, QKV_MLP, THIRDS, FluxModule, diffusers_index, module_table
from loraforge.formats.lora import ALPHA_SUFFIX, DOWN_SUFFIX, PAIR_SUFFIXES, UP_SUFFIX, LoraModule
from loraforge.formats.safetensors_io import RawTensor

if TYPE_CHECKING:
    from torch import Tensor

DOWN, UP, ALPHA = DOWN_SUFFIX[1:], UP_SUFFIX[1:], ALPHA_SUFFIX[1:]


def _rows(t: Any, start: int, stop: int) -> Any:
    return t.rows(start, stop) if isinstance(t, RawTensor) else t[start:stop]


def _cat_rows(parts: list[Any]) -> Any:
    if isinstance(parts[0], RawTensor):
        return RawTensor.cat_rows(parts)
    import torch

    return torch.cat(parts)


def qkv_only(fm: FluxModule) -> FluxModule:
    """A single block's `linear1` as XLabs adapts it: its q, k, v rows only (three of the hidden width)."""
    if fm.split != QKV_MLP:
        raise ValueError(f"{fm.bfl} is not a single block's linear1")
    return replace(fm, diffusers=fm.diffusers[:3], split=THIRDS)


def split_fused(fm: FluxModule, tensors: Mapping[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """{diffusers path: {suffix: tensor}} of the modules BFL module `fm` is, from the tensors of the one module
    a file holds for it (`lora_down.weight`, `lora_up.weight`, `alpha`, or a LyCORIS variant's on an unfused
    module); `key`: how the file names the module, for messages."""
    if not fm.fused and not fm.swap_halves:
        return {fm.diffusers[0]: dict(tensors)}
    factors = set(tensors) - {ALPHA}
    if factors != PAIR_SUFFIXES:
        raise FormatError(f"{key} holds {', '.join(sorted(factors))}, not a LoRA pair, on BFL's {fm.bfl}, which "
                          f"diffusers keeps as {', '.join(fm.diffusers)}: only LoRA pairs split exactly; "
                          "convert the adapter to LoRA pairs first")
    down, up = tensors[DOWN], tensors[UP]
    if down.dim() != 2 or up.dim() != 2:
        raise FormatError(f"{key}: a Flux linear module needs 2-D factors, got down {tuple(down.shape)} "
                          f"and up {tuple(up.shape)}")
    rows, hidden = int(up.shape[0]), int(down.shape[1])
    if fm.swap_halves:
        if rows % 2:
            raise FormatError(f"{key}: up has {rows} rows, but {fm.bfl} holds (shift, scale) halves")
        half = rows // 2
        return {fm.diffusers[0]: {**tensors, UP: _cat_rows([_rows(up, half, rows), _rows(up, 0, half)])}}
    sizes = fm.split_sizes(rows, hidden)
    if (fm.split == THIRDS and rows % 3) or min(sizes) <= 0:
        raise FormatError(f"{key}: up has {rows} rows, which do not split into {', '.join(fm.diffusers)} "
                          f"(input width {hidden})")
    out, start = {}, 0
    for path, size in zip(fm.diffusers, sizes):
        out[path] = {**tensors, UP: _rows(up, start, start + size)}
        start += size
    return out


def fuse_parts(fm: FluxModule, parts: Mapping[str, Any]) -> Any:
    """The one module on BFL module `fm` whose ΔW is that of `parts` ({diffusers path: module}, a subset of
    `fm.diffusers`) stacked by rows."""
    unknown = sorted(set(parts) - set(fm.diffusers))
    if unknown:
        raise ValueError(f"{unknown[0]} is not part of {fm.bfl}")
    if not fm.fused and not fm.swap_halves:
        return parts[fm.diffusers[0]]
    for path, m in sorted(parts.items()):
        if m.variant != "lora":
            raise FormatError(f"module transformer.{path} is a {m.variant} module; "
                              f"BFL's {fm.bfl} is one weight for {', '.join(fm.diffusers)}, and only LoRA pairs "
                              "fuse into it exactly; export as diffusers, or convert to LoRA pairs first")
        if m.is_conv:
            raise FormatError(f"module transformer.{path} is a conv pair, but Flux's {fm.bfl} is a linear layer")
    if fm.swap_halves:
        m = parts[fm.diffusers[0]]
        half = int(m.up.shape[0]) // 2
        return LoraModule(m.down, _cat_rows([_rows(m.up, half, 2 * half), _rows(m.up, 0, half)]), m.alpha)
    import torch

    present = [parts[p] for p in fm.diffusers if p in parts]
    hidden = int(present[0].down.shape[1])
    heights = _heights(fm, parts, hidden)
    for p, h in zip(fm.diffusers, heights):
        if p in parts and (int(parts[p].up.shape[0]) != h or int(parts[p].down.shape[1]) != hidden):
            raise FormatError(f"module transformer.{p} adapts a {tuple(parts[p].weight_shape)} weight, which does not stack "
                              f"with the other parts of BFL's {fm.bfl} ({h} rows of input width {hidden})")
    dtype = present[0].up.dtype
    first = present[0]
    shared = all(m.down.shape == first.down.shape and torch.equal(m.down, first.down) for m in present)
    one_scale = len({m.scale for m in present}) == 1
    if shared:
        rank = first.rank
        ups = [_scaled_up(parts[p], one_scale) if p in parts else torch.zeros(h, rank, dtype=dtype)
               for p, h in zip(fm.diffusers, heights)]
        return LoraModule(first.down, torch.cat([u.to(dtype) for u in ups]), first.alpha if one_scale else rank)
    total = sum(m.rank for m in present)
    up = torch.zeros(sum(heights), total, dtype=dtype)
    row = col = 0
    for p, h in zip(fm.diffusers, heights):
        if p in parts:
            m = parts[p]
            up[row:row + h, col:col + m.rank] = _scaled_up(m, one_scale).to(dtype)
            col += m.rank
        row += h
    down = torch.cat([m.down.to(first.down.dtype) for m in present])
    return LoraModule(down, up, first.scale * total if one_scale else total)


def _scaled_up(m: LoraModule, one_scale: bool) -> Tensor:
    """`up` as it stands beside the other parts: as is under one shared scale, else with its own scale in it."""
    import torch

    return m.up if one_scale else (m.up.to(torch.float32) * m.scale).to(m.up.dtype)


def _heights(fm: FluxModule, parts: Mapping[str, Any], hidden: int) -> list[int]:
    """Rows of each diffusers module of fused `fm`; a missing one's from its siblings (or Flux's MLP ratio)."""
    rows = {p: int(m.up.shape[0]) for p, m in parts.items()}
    if fm.split == THIRDS:
        height = next(iter(rows.values()))
        return [height] * 3
    mlp = fm.diffusers[3]
    return [hidden] * 3 + [rows.get(mlp, MLP_RATIO * hidden)]


def from_bfl(groups: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{diffusers path: {suffix: tensor}} of a file's modules on BFL names ({BFL module name: {suffix: tensor}});
    `labels`: how the file spells each BFL name, for messages."""
    table = module_table(groups)
    out: dict[str, dict[str, Any]] = {}
    for bfl in sorted(groups):
        fm = table.get(bfl)
        if fm is None:
            raise FormatError(f"{labels[bfl]} names {bfl}, which is no module of a Flux transformer")
        out.update(split_fused(fm, groups[bfl], labels[bfl]))
    return out


def to_bfl(modules: Mapping[str, Any]) -> dict[str, Any]:
    """{BFL module name: module} of a transformer's modules ({diffusers path: module}), fused modules fused."""
    table = module_table(modules)
    index = diffusers_index(table)
    by_bfl: dict[str, dict[str, Any]] = {}
    for path, m in modules.items():
        if path not in index:
            raise FormatError(f"module transformer.{path} is no module of a Flux transformer, so it has no BFL name; "
                              "export the adapter as diffusers")
        by_bfl.setdefault(index[path][0].bfl, {})[path] = m
    return {bfl: fuse_parts(table[bfl], parts) for bfl, parts in sorted(by_bfl.items())}
