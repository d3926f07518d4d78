"""`render:` steps: a labelled image grid — prompts × seeds down, one adapter's weight sweep across.

The adapters are loaded into the pipeline once; each column only changes their weights with
`set_adapters`, and every row uses the same seed in every column, so columns differ by the sweep alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from loraforge.errors import ConfigError
from loraforge.home import tmp_dir
from loraforge.ops.specs import AdapterInput
from loraforge.plugins import STEP_KINDS
from loraforge.recipes.step_kind import (Spec, SpecReference, StepContext, StepDefaults, StepKind,
                                         adapter_references, fill_base)
from loraforge.registry.manifest import BaseInfo, Manifest, Parent, Provenance


class SweepSpec(Spec):
    adapter: str = Field(description="The adapter or slider whose weight varies across the grid's columns.")
    scales: list[float] = Field(min_length=1, description="Weights (a slider's scales), one column each.")
    label: Optional[str] = Field(None, description="Column label prefix (default: the adapter's reference).")


class RenderSpec(Spec):
    base: Optional[str] = Field(None, description="Checkpoint to render with (default: the recipe's base).")
    base_config: Optional[str] = Field(None, description="Diffusers folder of the base's architecture whose configs "
                                                         "and tokenizers a single-file base is read with.")
    adapters: list[AdapterInput] = Field(default_factory=list, description="Adapters applied at fixed weights.")
    prompts: list[str] = Field(min_length=1, description="One grid row per prompt and seed.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds; the same seed gives the same noise in every column.")
    sweep: Optional[SweepSpec] = Field(None, description="Vary one adapter's weight across columns.")
    steps: int = Field(10, ge=1, description="Denoising steps per image.")
    guidance: float = Field(5.0, description="Classifier-free guidance scale.")
    size: Optional[int] = Field(None, ge=8, description="Image size in pixels (default: the model's).")
    negative_prompt: Optional[str] = None
    title: Optional[str] = Field(None, description="Grid title (default: recipe name and step id).")
    views: Optional[list[str]] = Field(
        None, description="Render visual-anagram illusions: one view per '|'-separated part of each prompt "
                          "(identity, vflip, hflip, rot90, rot180, rot270, negate, jigsaw); the columns show "
                          "the image as each view sees it.")

    @model_validator(mode="after")
    def _size_in_latent_blocks(self) -> "RenderSpec":
        from loraforge.render.generate import size_problem

        problem = size_problem(self.size)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _illusion_prompts(self) -> "RenderSpec":
        if self.views:
            from loraforge.render.views import parse_view

            for view in self.views:
                parse_view(view)
            if self.sweep is not None:
                raise ValueError("an illusion render (views) cannot also sweep an adapter; use two render steps")
            for prompt in self.prompts:
                parts = [p for p in prompt.split("|") if p.strip()]
                if len(parts) != len(self.views):
                    raise ValueError(f"illusion prompt {prompt!r} has {len(parts)} part(s) for {len(self.views)} "
                                     "views; give one prompt per view separated by '|'")
        return self


@STEP_KINDS.register("render")
class RenderStep(StepKind):
    """A labelled image grid: prompts × seeds, optionally sweeping one adapter's weight."""

    spec_class = RenderSpec

    def output_kind(self, spec: RenderSpec) -> str:
        return "image"

    def references(self, spec: RenderSpec) -> list[SpecReference]:
        refs = [SpecReference(("base",), "model", spec.base), *adapter_references(spec.adapters)]
        if spec.sweep is not None:
            refs.append(SpecReference(("sweep", "adapter"), "adapter", spec.sweep.adapter))
        return refs

    def with_defaults(self, spec: RenderSpec, defaults: StepDefaults) -> RenderSpec:
        spec = fill_base(spec, defaults)
        if spec.title is None:
            spec = spec.model_copy(update={"title": f"{defaults.recipe_name} / {defaults.step_id}"})
        return spec

    def run(self, ctx: StepContext) -> Manifest:
        spec = ctx.spec
        grid, cells, parents, base = render_grid(ctx.registry, spec)
        rows, cols, _ = grid_labels(spec)
        manifest = Manifest(
            name=ctx.output, kind="image", digest="", files=[],
            base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
            provenance=Provenance(method="render:illusion" if spec.views else "render:grid",
                                  params=spec.model_dump(mode="json")),
            metrics={"rows": len(rows), "columns": len(cols), "cell_size": list(cells[0][0].size),
                     "grid_size": list(grid.size)},
        )
        manifest = ctx.stamp(manifest, parents=parents)
        with tempfile.TemporaryDirectory(dir=tmp_dir(ctx.registry.home), prefix="render-") as tmp:
            path = Path(tmp) / "grid.png"
            grid.save(path, format="PNG")
            return ctx.registry.register(manifest, [(path, "grid.png")], input_digest=ctx.input_digest)


def grid_labels(spec) -> tuple[list[tuple[str, int]], list[str], list[float | None]]:
    """(rows as (prompt, seed), column labels, the sweep weight of each column or None)."""
    rows = [(p, s) for p in spec.prompts for s in spec.seeds]
    if spec.views:
        return rows, [f"view {v}" for v in spec.views], [None] * len(spec.views)
    if spec.sweep is None:
        return rows, ["as stacked"], [None]
    label = spec.sweep.label or spec.sweep.adapter
    return rows, [f"{label} = {w:g}" for w in spec.sweep.scales], list(spec.sweep.scales)


def render_grid(registry, spec, progress=None):
    """(grid image, [[cell images]], parents) for a concrete render spec."""
    from loraforge.models.base_config import with_config
    from loraforge.models.pipeline import load_pipeline
    from loraforge.render.grid import image_grid
    from loraforge.registry.resolve import base_targets, load_adapter, resolve_base
    from loraforge.render import apply_adapters
    from loraforge.render.adapters import reweightable

    base = with_config(resolve_base(registry, spec.base), spec.base_config)
    targets = base_targets(base)
    adapters = [(a.ref, a.weight) for a in spec.adapters]
    sweep_index = None
    if spec.sweep is not None:
        refs = [r for r, _ in adapters]
        if spec.sweep.adapter in refs:
            sweep_index = refs.index(spec.sweep.adapter)
        else:
            adapters.append((spec.sweep.adapter, 0.0))
            sweep_index = len(adapters) - 1
    parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
    loaded = []
    for ref, weight in adapters:
        state, manifest = load_adapter(registry, ref, base=base)
        if targets is not None:
            state.check_against(targets)
        loaded.append((state, weight))
        parents.append(Parent(ref=manifest.ref if manifest else ref, digest=manifest.digest if manifest else None,
                              role="adapter", weight=None if len(parents) - 1 == sweep_index else weight))
    if sweep_index is not None and not reweightable(loaded[sweep_index][0]):
        raise ConfigError(f"render sweep: adapter {adapters[sweep_index][0]} has full-weight, DoRA, bias or norm "
                          "differences, which are added to the weights once and cannot change weight per column; "
                          "sweep a LoRA, LoHa, LoKr or Tucker LoCon adapter, or render one grid per weight")
    pipe = load_pipeline(base)
    names = apply_adapters(pipe, loaded)
    rows, col_labels, sweep = grid_labels(spec)
    cells: list[list] = [[] for _ in rows]
    if spec.views:
        cells = _illusion_rows(pipe, rows, spec)
        sweep = []
    for weight in sweep:
        if any(n is not None for n in names):
            weights = [w for _, w in loaded]
            if weight is not None:
                weights[sweep_index] = weight
            pipe.set_adapters([n for n in names if n is not None],
                              adapter_weights=[w for n, w in zip(names, weights) if n is not None])
        for i, image in enumerate(_column(pipe, rows, spec)):
            cells[i].append(image)
        if progress:
            progress()
    row_labels = [f"{prompt} | seed {seed}" for prompt, seed in rows]
    grid = image_grid(cells, row_labels, col_labels, title=spec.title)
    return grid, cells, parents, base


def _illusion_rows(pipe, rows: list[tuple[str, int]], spec) -> list[list]:
    """One row per (prompt, seed): the illusion as each view sees it (see `loraforge.render.illusion`)."""
    from loraforge.render.illusion import illusion_sample, split_view_prompts

    out = []
    for prompt, seed in rows:
        _image, per_view = illusion_sample(
            pipe, split_view_prompts(prompt, len(spec.views)), spec.views, seed, spec.steps, spec.guidance,
            height=spec.size, width=spec.size, negative_prompt=spec.negative_prompt or "", return_views=True)
        out.append(list(per_view))
    return out


def _column(pipe, rows: list[tuple[str, int]], spec) -> list:
    """All rows of one column in one batched call: one generator per row, so each row's noise is
    exactly what a single-image call with that seed draws (small models run far faster batched)."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in rows]
    negative = [spec.negative_prompt] * len(rows) if spec.negative_prompt else None
    result = pipe([p for p, _ in rows], num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                  height=spec.size, width=spec.size, negative_prompt=negative, generator=generators,
                  output_type="pil")
    return list(result.images)

