"""Comparison renders: one grid, a row per (prompt, seed), a column per artifact set — the base alone, a LoRA,
a DreamBooth-LoRA, an embedding, a checkpoint in its own pipeline, several sliders at fixed scales — and every
cell of a row drawn from the same seed, so columns differ by what they render with and nothing else.

The recipe `render` step (`compare:`) and `loraforge render --compare` both call `render_comparison`.
Columns on one base share one pipeline: each LoRA-loadable adapter is loaded once and every column only
switches the active set with `set_adapters`; a column whose adapters are added to the weights (full, DoRA,
bias or norm differences) or that is not a LoRA (an embedding changes the tokenizer) gets a pipeline of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from loraforge.errors import ConfigError
from loraforge.registry.refs import parse_weighted
from loraforge.render.sliders import default_warn, slider_range_problem

BASE_COLUMN = "base"  # a column of the base alone, no adapter


@dataclass(frozen=True)
class Column:
    """What one column renders with: (ref, weight) items — at most one checkpoint, which replaces the base, and
    any adapters — and its label (default: the items' refs with their weights)."""

    items: tuple[tuple[str, float], ...] = ()
    label: Optional[str] = None


def parse_column(text: str) -> Column:
    """A column as the command line writes it: `base`, `REF`, `REF=W`, or `REF=W,REF=W` (one column composing
    several artifacts, e.g. sliders at fixed scales)."""
    text = text.strip()
    if text == BASE_COLUMN:
        return Column()
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise ConfigError(f"empty entry in column {text!r}: write base, REF, REF=W or REF=W,REF=W")
    return Column(tuple(parse_weighted(p) for p in parts))


def weighted_label(ref: str, weight: float, show_weight: bool = True) -> str:
    """`age:1=+1.5`: a ref with its signed weight (a slider's scale), or the ref alone when the weight says nothing."""
    return f"{ref}={weight:+g}" if show_weight else ref


@dataclass
class _Adapter:
    ref: str
    weight: float
    state: object
    manifest: object  # Manifest, or None for a file outside the registry


@dataclass
class _Plan:
    """A column resolved: the base it renders on, its adapters, and whether it can share that base's pipeline."""

    label: str
    base: object  # models.base.BaseModel
    checkpoint: Optional[object] = None  # the checkpoint's Manifest when the column replaces the base
    checkpoint_ref: Optional[str] = None
    adapters: list[_Adapter] = field(default_factory=list)
    shared: bool = True


def _is_model(registry, ref: str):
    """(True, manifest or None) when `ref` names a model (a checkpoint, builtin, Hub model id or diffusers
    folder), (False, manifest or None) when it names an adapter or something else."""
    from loraforge.reference import Reference
    from loraforge.registry.resolve import resolve_artifact

    parsed = Reference.parse(ref)
    if parsed.kind in ("builtin", "hub_model"):
        return True, None
    if parsed.kind == "path":
        from loraforge.registry.importer import detect_kind

        return detect_kind(parsed.path) == "checkpoint", None  # what `registry import` would call it
    manifest = resolve_artifact(registry, parsed)
    return manifest.kind == "checkpoint", manifest


def _switchable(adapter: _Adapter) -> bool:
    """Whether `set_adapters` can turn the adapter on and off in a shared pipeline."""
    from loraforge.render.adapters import reweightable

    if adapter.manifest is not None and adapter.manifest.kind not in ("lora", "slider"):
        return False
    return hasattr(adapter.state, "is_plain_lora") and reweightable(adapter.state)


def _plan_column(registry, base, column: Column, warn: Callable[[str], None]) -> _Plan:
    from loraforge.registry.resolve import base_targets, load_adapter, resolve_base

    models, adapters = [], []
    seen = set()
    for ref, weight in column.items:
        if ref in seen:
            raise ConfigError(f"column {_written(column)} names {ref} twice: give each artifact once, "
                              "with the weight wanted")
        seen.add(ref)
        is_model, manifest = _is_model(registry, ref)
        (models if is_model else adapters).append((ref, weight, manifest))
    if len(models) > 1:
        raise ConfigError(f"column {_written(column)} names two models ({models[0][0]} and {models[1][0]}): "
                          "a column renders on one checkpoint; give each its own column")
    checkpoint = checkpoint_ref = None
    if models:
        checkpoint_ref, weight, checkpoint = models[0]
        if weight != 1.0:
            raise ConfigError(f"checkpoint {checkpoint_ref} in a comparison has weight {weight:g}: a checkpoint is "
                              f"rendered as it is; write {checkpoint_ref} without =W (merge it first to blend it)")
        base = resolve_base(registry, checkpoint_ref)
    targets = base_targets(base)
    loaded = []
    for ref, weight, _manifest in adapters:
        state, manifest = load_adapter(registry, ref, base=base)
        if targets is not None and hasattr(state, "check_against"):
            state.check_against(targets)
        problem = slider_range_problem(manifest, manifest.ref if manifest else ref, weight)
        if problem:
            warn(problem)
        loaded.append(_Adapter(ref, weight, state, manifest))
    label = column.label or _label(checkpoint_ref, loaded)
    return _Plan(label, base, checkpoint, checkpoint_ref, loaded, shared=all(_switchable(a) for a in loaded))


def _written(column: Column) -> str:
    return repr(",".join(f"{r}={w:g}" for r, w in column.items))


def _label(checkpoint_ref: Optional[str], adapters: list[_Adapter]) -> str:
    """One line per artifact: the checkpoint, then each adapter; weights shown for sliders (their scale is the
    point) and for any weight but 1, so `age=+1.5` / `smile=-0.5` read in the grid."""
    lines = [checkpoint_ref] if checkpoint_ref else []
    for a in adapters:
        slider = a.manifest is not None and a.manifest.kind == "slider"
        lines.append(weighted_label(a.ref, a.weight, show_weight=slider or a.weight != 1.0))
    return "\n".join(lines) or BASE_COLUMN


@dataclass
class Comparison:
    """A rendered comparison: the grid, its cells ([row][column] PIL images), labels, and what it rendered with."""

    grid: object
    cells: list[list]
    row_labels: list[str]
    column_labels: list[str]
    parents: list  # registry Parent entries: the base, then each column's checkpoint and adapters
    base: object


def render_comparison(registry, base_ref: str, columns: Sequence[Column], prompts: Sequence[str], *,
                      seeds: Sequence[int] = (0,), steps: int = 20, guidance: float = 5.0, size: Optional[int] = None,
                      negative_prompt: Optional[str] = None, title: Optional[str] = None,
                      config: Optional[str] = None, warn: Callable[[str], None] = default_warn,
                      progress: Optional[Callable[[], None]] = None) -> Comparison:
    """Render `prompts` × `seeds` (rows) with each of `columns` on the base `base_ref` (see the module docstring).

    `warn` receives one line per slider used outside its recorded scale range (the render goes on);
    `progress` is called once per column rendered.
    """
    from loraforge.models.base_config import with_config
    from loraforge.registry.manifest import Parent
    from loraforge.registry.resolve import resolve_base
    from loraforge.render.generate import check_generation
    from loraforge.render.grid import image_grid

    check_generation(steps, size)
    if not columns:
        raise ConfigError("a comparison needs at least one column: base, an adapter or a checkpoint")
    if not prompts:
        raise ConfigError("a comparison needs at least one prompt")
    base = with_config(resolve_base(registry, base_ref), config)
    plans = [_plan_column(registry, base, c, warn) for c in columns]
    rows = [(p, s) for p in prompts for s in seeds]
    by_column = _render_plans(plans, rows, steps=steps, guidance=guidance, size=size,
                              negative_prompt=negative_prompt, progress=progress)
    cells = [[by_column[j][i] for j in range(len(plans))] for i in range(len(rows))]
    row_labels = [f"{prompt} | seed {seed}" for prompt, seed in rows]
    col_labels = [p.label for p in plans]
    grid = image_grid(cells, row_labels, col_labels, title=title)
    parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
    for plan in plans:
        if plan.checkpoint_ref:
            parents.append(Parent(ref=plan.checkpoint.ref if plan.checkpoint else plan.base.ref,
                                  digest=plan.checkpoint.digest if plan.checkpoint else plan.base.digest, role="model"))
        for a in plan.adapters:
            parents.append(Parent(ref=a.manifest.ref if a.manifest else a.ref,
                                  digest=a.manifest.digest if a.manifest else None, role="adapter", weight=a.weight))
    return Comparison(grid, cells, row_labels, col_labels, parents, base)


def _render_plans(plans: list[_Plan], rows, *, size=None, progress=None, **generation) -> dict[int, list]:
    """{column index: images of every row}: one pipeline per base for the columns that share it, loaded once
    (its adapters too), then one for each column that needs its own."""
    from loraforge.models.pipeline import generate, load_pipeline
    from loraforge.render.adapters import apply_adapters

    groups: dict[tuple, list[int]] = {}
    for j, plan in enumerate(plans):
        key = (str(plan.base.path), plan.base.ref) if plan.shared else ("own", j)
        groups.setdefault(key, []).append(j)
    out: dict[int, list] = {}

    def render(j: int, pipe) -> None:
        # One call per cell, the call `loraforge generate` makes: a cell is exactly that command's image (a
        # batch of rows would differ from it by rounding, a level or two of a pixel).
        out[j] = [generate(pipe, prompt, seed=seed, height=size, width=size, **generation) for prompt, seed in rows]
        if progress:
            progress()

    for members in groups.values():
        pipe = None  # the last group's pipeline is freed before the next one loads
        pipe = load_pipeline(plans[members[0]].base)
        if not plans[members[0]].shared:
            (j,) = members
            apply_adapters(pipe, [(a.state, a.weight) for a in plans[j].adapters], base_ref=plans[j].base.ref)
            render(j, pipe)
            continue
        # The base alone first, before any adapter is loaded into the pipeline: exactly the base's images.
        for j in [j for j in members if not plans[j].adapters]:
            render(j, pipe)
        distinct: dict[str, object] = {}
        for j in members:
            for a in plans[j].adapters:
                distinct.setdefault(a.ref, a.state)
        if not distinct:
            continue
        names = dict(zip(distinct, apply_adapters(pipe, [(s, 1.0) for s in distinct.values()],
                                                  base_ref=plans[members[0]].base.ref)))
        for j in [j for j in members if plans[j].adapters]:
            pipe.set_adapters([names[a.ref] for a in plans[j].adapters],
                              adapter_weights=[a.weight for a in plans[j].adapters])
            render(j, pipe)
    return out
