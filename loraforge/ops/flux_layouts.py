"""A Flux checkpoint read in the other layout: a BFL single file seen as a diffusers folder's transformer, or a
diffusers folder's transformer seen as a BFL single file, through the row plans of models.flux_single_file.

A converted tensor is rows of source tensors, so every read, a row range included, is streamed straight from
the source's rows into the caller's buffer: nothing is assembled or kept, and a merge's memory stays the few
chunks it is for inputs of the same layout."""

from __future__ import annotations

from typing import Optional

import torch

from loraforge.errors import FormatError
from loraforge.formats.safetensors_io import TensorInfo
from loraforge.ops.views import CheckpointView
from loraforge.models.flux_single_file import (
    RowPlan, Segment, bfl_plans, bfl_transformer_key, bfl_wrapper, diffusers_plans,
)

TRANSFORMER = "transformer/"


class FluxLayoutView(CheckpointView):
    """Opened Flux checkpoint `source` in `layout`; `plans`: this view's keys → rows of the source's keys."""

    untranslated: frozenset = frozenset()

    def __init__(self, source, layout: str, plans: dict[str, RowPlan]):
        self.source, self.layout, self.index = source, layout, plans
        self._infos: dict[str, TensorInfo] = {}
        for key, plan in plans.items():
            dtypes = {source.info(seg.key).dtype for seg in plan.segments}
            if len(dtypes) > 1:
                raise FormatError(f"{source.ref}: the parts of {key} are stored in different dtypes ({sorted(dtypes)})")
            self._infos[key] = TensorInfo(dtypes.pop(), plan.shape, 0, 0)

    @classmethod
    def as_diffusers(cls, single) -> "FluxLayoutView":
        """BFL single file `single` as a diffusers folder's `transformer/…` tensors."""
        plans, _ = diffusers_plans({k: single.info(k).shape for k in single.index})
        return cls(single, "diffusers", {TRANSFORMER + k: p for k, p in plans.items()})

    @classmethod
    def as_single_file(cls, folder, wrapper: str = "") -> "FluxLayoutView":
        """Diffusers Flux folder `folder`'s transformer as a BFL single file with names under `wrapper`."""
        shapes = {k[len(TRANSFORMER):]: folder.info(k).shape for k in folder.index if k.startswith(TRANSFORMER)}
        plans, _ = bfl_plans(shapes, wrapper)
        prefixed = {k: RowPlan(p.shape, tuple(Segment(TRANSFORMER + s.key, s.start, s.stop) for s in p.segments))
                    for k, p in plans.items()}
        return cls(folder, "single_file", prefixed)

    @classmethod
    def rewrapped(cls, single, wrapper: str) -> "FluxLayoutView":
        """BFL single file `single` with its transformer's names under `wrapper` instead of its own."""
        own = bfl_wrapper(single.index)
        plans = {wrapper + k[len(own):]: RowPlan(single.info(k).shape, (Segment(k, 0, _rows(single.info(k).shape)),))
                 for k in single.index if k.startswith(own) and bfl_transformer_key(k) is not None}
        return cls(single, "single_file", plans)

    def close(self) -> None:
        self.source.close()

    def component(self, ckey: str) -> str:
        return "transformer"  # every view holds a Flux transformer's tensors alone

    def read_into(self, ckey: str, buffer: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Rows `rows` (all when None) of tensor `ckey` read into the start of flat `buffer`, each source segment
        straight into its place; returns the view with the stored dtype and shape."""
        info = self._infos[ckey]
        _, nbytes, shape = self.span(ckey, rows)
        raw = buffer.view(torch.uint8)
        if raw.numel() < nbytes:
            raise ValueError(f"buffer of {raw.numel()} bytes is too small for {nbytes} bytes of {ckey}")
        full_rows = info.shape[0] if info.shape else 1
        row_bytes = self.span(ckey)[1] // full_rows if full_rows else 0
        for seg, at in self.index[ckey].pieces(rows):
            self.source.read_into(seg.key, raw[at * row_bytes:], (seg.start, seg.stop) if info.shape else None)
        return raw[:nbytes].view(info.torch_dtype).view(shape)

    def get(self, ckey: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        return self.read_into(ckey, torch.empty(self.span(ckey, rows)[1], dtype=torch.uint8), rows)


def _rows(shape) -> int:
    return shape[0] if shape else 1


def flux_in_layout_of(first, other):
    """Flux checkpoint `other` read in the layout of `first`: a BFL file as a diffusers folder or the reverse, a
    BFL file under another wrapper (`model.diffusion_model.`) under `first`'s; `other` itself when it has it."""
    if first.layout == "diffusers":
        return other if other.layout == "diffusers" else FluxLayoutView.as_diffusers(other)
    wrapper = bfl_wrapper(first.index)
    if other.layout == "diffusers":
        return FluxLayoutView.as_single_file(other, wrapper)
    return other if bfl_wrapper(other.index) == wrapper else FluxLayoutView.rewrapped(other, wrapper)
