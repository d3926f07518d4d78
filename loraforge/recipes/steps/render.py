"""`render:` steps: a labelled image grid — prompts × seeds down; across, one adapter's weight sweep, the
artifacts of a comparison (`compare:`, see `loraforge.render.compare`) or the views of an illusion.

The adapters are loaded into the pipeline once; each column only changes their weights with
`set_adapters`, and every row uses the same seed in every column, so columns differ by the sweep alone.
A slider used outside its recorded scale range is rendered, with a one-line warning on stderr.
"""

from __future__ import annotations

import tempfile
import sys
from pathlib import Path
from typing import Any, Optional, Union

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


def _adapter_inputs(value: Any) -> Any:
    """`[REF, {ref, weight}]` as adapter inputs: a bare reference is that adapter at weight 1."""
    if isinstance(value, list):
        return [{"ref": v} if isinstance(v, str) else v for v in value]
    return value


class CompareColumn(Spec):
    artifacts: list[AdapterInput] = Field(
        default_factory=list, description="What the column renders with: at most one checkpoint (rendered in its own "
                                          "pipeline) and any adapters at their weights; none is the base alone.")
    label: Optional[str] = Field(None, description="Column label (default: each artifact's ref, with its weight "
                                                   "when it is a slider or not 1).")

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        """`base`, `REF`, `{ref: REF, weight: W}` or a list of those: the column's artifacts."""
        if isinstance(data, str):
            from loraforge.render.compare import BASE_COLUMN

            return {"artifacts": [] if data.strip() == BASE_COLUMN else [{"ref": data}]}
        if isinstance(data, list):
            return {"artifacts": _adapter_inputs(data)}
        if isinstance(data, dict) and "ref" in data:
            return {"artifacts": [{k: v for k, v in data.items() if k != "label"}],
                    **({"label": data["label"]} if "label" in data else {})}
        if isinstance(data, dict) and "artifacts" in data:
            return {**data, "artifacts": _adapter_inputs(data["artifacts"])}
        return data


class ViewInput(Spec):
    view: str = Field(description="identity, vflip, hflip, rot90, rot180, rot270, negate or jigsaw[:GRID[:SEED]].")
    adapters: list[AdapterInput] = Field(
        default_factory=list, description="Adapters active only while this view is denoised (with the step's "
                                          "`adapters`), e.g. the view's adapter of a joint run.")

    @model_validator(mode="before")
    @classmethod
    def _bare_refs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "adapters" in data:
            return {**data, "adapters": _adapter_inputs(data["adapters"])}
        return data


def view_name(view: Union[str, ViewInput]) -> str:
    return view.view if isinstance(view, ViewInput) else view


class RenderSpec(Spec):
    base: Optional[str] = Field(None, description="Checkpoint to render with (default: the recipe's base).")
    base_config: Optional[str] = Field(None, description="Diffusers folder of the base's architecture whose configs "
                                                         "and tokenizers a single-file base is read with.")
    adapters: list[AdapterInput] = Field(default_factory=list, description="Adapters applied at fixed weights.")
    prompts: list[str] = Field(min_length=1, description="One grid row per prompt and seed.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds; the same seed gives the same noise in every "
                                                            "column (`seed: N` is `seeds: [N]`).")
    sweep: Optional[SweepSpec] = Field(None, description="Vary one adapter's weight across columns.")
    compare: Optional[list[CompareColumn]] = Field(
        None, min_length=1, description="Compare artifacts side by side, one column each: `base` (no adapter), a LoRA, "
                                        "a slider or an embedding at weight 1, a checkpoint (its own pipeline), "
                                        "{ref, weight}, or a list of those composed in one column (sliders at "
                                        "fixed scales).")
    steps: int = Field(10, ge=1, description="Denoising steps per image.")
    guidance: float = Field(5.0, description="Classifier-free guidance scale.")
    size: Optional[int] = Field(None, ge=8, description="Image size in pixels (default: the model's).")
    negative_prompt: Optional[str] = None
    title: Optional[str] = Field(None, description="Grid title (default: recipe name and step id).")
    views: Optional[list[Union[str, ViewInput]]] = Field(
        None, description="Render visual-anagram illusions: one view per '|'-separated part of each prompt "
                          "(identity, vflip, hflip, rot90, rot180, rot270, negate, jigsaw), or {view, adapters} "
                          "to denoise that view with its own adapters; the columns show the image as each view "
                          "sees it.")

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            if "seeds" in data:
                raise ValueError("give seed or seeds, not both")
            data = {**{k: v for k, v in data.items() if k != "seed"}, "seeds": [data["seed"]]}
        return data

    @model_validator(mode="after")
    def _one_layout(self) -> "RenderSpec":
        if self.compare is not None:
            for other in ("sweep", "views"):
                if getattr(self, other):
                    raise ValueError(f"a comparison (compare) cannot also have {other}; use two render steps")
            if self.adapters:
                raise ValueError("a comparison (compare) applies no step-wide adapters: list them in each "
                                 "column, e.g. compare: [[${lora}, ${slider}], ...]")
        return self

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
                parse_view(view_name(view))
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
        for i, column in enumerate(spec.compare or []):
            # A column's artifact is an adapter or a checkpoint: which one is known when it resolves.
            refs += [SpecReference(("compare", i, "artifacts", j, "ref"), "artifact", a.ref)
                     for j, a in enumerate(column.artifacts)]
        for i, view in enumerate(spec.views or []):
            if isinstance(view, ViewInput):
                refs += [SpecReference(("views", i, "adapters", j, "ref"), "adapter", a.ref)
                         for j, a in enumerate(view.adapters)]
        return refs

    def with_defaults(self, spec: RenderSpec, defaults: StepDefaults) -> RenderSpec:
        spec = fill_base(spec, defaults)
        if spec.title is None:
            spec = spec.model_copy(update={"title": f"{defaults.recipe_name} / {defaults.step_id}"})
        return spec

    def run(self, ctx: StepContext) -> Manifest:
        spec = ctx.spec
        if spec.compare is not None:
            grid, cells, parents, base = compare_grid(ctx.registry, spec)
            method = "render:compare"
        else:
            grid, cells, parents, base = render_grid(ctx.registry, spec)
            method = "render:illusion" if spec.views else "render:grid"
        manifest = Manifest(
            name=ctx.output, kind="image", digest="", files=[],
            base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
            provenance=Provenance(method=method, params=spec.model_dump(mode="json")),
            metrics={"rows": len(cells), "columns": len(cells[0]), "cell_size": list(cells[0][0].size),
                     "grid_size": list(grid.size)},
        )
        manifest = ctx.stamp(manifest, parents=parents)
        with tempfile.TemporaryDirectory(dir=tmp_dir(ctx.registry.home), prefix="render-") as tmp:
            path = Path(tmp) / "grid.png"
            grid.save(path, format="PNG")
            return ctx.registry.register(manifest, [(path, "grid.png")], input_digest=ctx.input_digest)


def warn_on_stderr(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


def compare_grid(registry, spec, progress=None, warn=warn_on_stderr):
    """(grid image, [[cell images]], parents, base) of a `compare:` render spec."""
    from loraforge.render.compare import Column, render_comparison

    columns = [Column(tuple((a.ref, a.weight) for a in c.artifacts), c.label) for c in spec.compare]
    result = render_comparison(registry, spec.base, columns, spec.prompts, seeds=spec.seeds, steps=spec.steps,
                               guidance=spec.guidance, size=spec.size, negative_prompt=spec.negative_prompt,
                               title=spec.title, config=spec.base_config, warn=warn, progress=progress)
    return result.grid, result.cells, result.parents, result.base


def grid_labels(spec) -> tuple[list[tuple[str, int]], list[str], list[float | None]]:
    """(rows as (prompt, seed), column labels, the sweep weight of each column or None)."""
    from loraforge.render.compare import weighted_label

    rows = [(p, s) for p in spec.prompts for s in spec.seeds]
    if spec.views:
        labels = ["\n".join([f"view {view_name(v)}"] + [weighted_label(a.ref, a.weight, a.weight != 1.0)
                                                          for a in getattr(v, "adapters", [])])
                  for v in spec.views]
        return rows, labels, [None] * len(spec.views)
    if spec.sweep is None:
        stacked = [weighted_label(a.ref, a.weight) for a in spec.adapters]
        return rows, ["\n".join(stacked) or "base"], [None]
    label = spec.sweep.label or spec.sweep.adapter
    return rows, [f"{label} = {w:g}" for w in spec.sweep.scales], list(spec.sweep.scales)


def render_grid(registry, spec, progress=None, warn=warn_on_stderr):
    """(grid image, [[cell images]], parents, base) for a concrete render spec (a sweep, a stack or an illusion)."""
    from loraforge.models.base_config import with_config
    from loraforge.models.pipeline import load_pipeline
    from loraforge.render.sliders import slider_range_problem
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
    view_indices = []  # per view: the indices into `adapters` of the adapters only that view uses
    for view in spec.views or []:
        own = list(getattr(view, "adapters", []))
        view_indices.append(list(range(len(adapters), len(adapters) + len(own))))
        adapters += [(a.ref, a.weight) for a in own]
    parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
    loaded = []
    for index, (ref, weight) in enumerate(adapters):
        state, manifest = load_adapter(registry, ref, base=base)
        if targets is not None:
            state.check_against(targets)
        loaded.append((state, weight))
        for scale in spec.sweep.scales if index == sweep_index else [weight]:
            problem = slider_range_problem(manifest, ref, scale)
            if problem:
                warn(problem)
        parents.append(Parent(ref=manifest.ref if manifest else ref, digest=manifest.digest if manifest else None,
                              role="adapter", weight=None if index == sweep_index else weight))
    if sweep_index is not None and not reweightable(loaded[sweep_index][0]):
        raise ConfigError(f"render sweep: adapter {adapters[sweep_index][0]} has full-weight, DoRA, bias or norm "
                          "differences, which are added to the weights once and cannot change weight per column; "
                          "sweep a LoRA, LoHa, LoKr or Tucker LoCon adapter, or render one grid per weight")
    for index in (i for own in view_indices for i in own):
        if not reweightable(loaded[index][0]):
            raise ConfigError(f"illusion view adapter {adapters[index][0]} has full-weight, DoRA, bias or norm "
                              "differences, which are added to the weights of every view; apply it to all views "
                              "(the step's adapters) or give the view a LoRA, LoHa, LoKr or Tucker LoCon adapter")
    pipe = load_pipeline(base)
    names = apply_adapters(pipe, loaded, base_ref=base.ref)
    rows, col_labels, sweep = grid_labels(spec)
    cells: list[list] = [[] for _ in rows]
    if spec.views:
        view_sets = None
        if any(view_indices):
            shared = [i for i in range(len(spec.adapters)) if names[i] is not None]
            # An embedding (no diffusers adapter name) is in the tokenizer for every view; only a prompt with its
            # token reads it, so it is as view-specific as the prompts are.
            view_sets = [[(names[i], adapters[i][1]) for i in shared + own if names[i] is not None]
                         for own in view_indices]
        cells = _illusion_rows(pipe, rows, spec, view_sets)
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


def _illusion_rows(pipe, rows: list[tuple[str, int]], spec, view_sets=None) -> list[list]:
    """One row per (prompt, seed): the illusion as each view sees it (see `loraforge.render.illusion`);
    `view_sets[i]`: the (adapter name, weight) pairs view i is denoised with."""
    from loraforge.render.illusion import illusion_sample, split_view_prompts

    views = [view_name(v) for v in spec.views]
    out = []
    for prompt, seed in rows:
        _image, per_view = illusion_sample(
            pipe, split_view_prompts(prompt, len(views)), views, seed, spec.steps, spec.guidance,
            height=spec.size, width=spec.size, negative_prompt=spec.negative_prompt or "", return_views=True,
            view_adapters=view_sets)
        out.append(list(per_view))
    return out


def _column(pipe, rows: list[tuple[str, int]], spec) -> list:
    """All rows of one column in one batched call (`loraforge.render.generate.render_rows`)."""
    from loraforge.render.generate import render_rows

    return render_rows(pipe, rows, steps=spec.steps, guidance=spec.guidance, size=spec.size,
                       negative_prompt=spec.negative_prompt)
