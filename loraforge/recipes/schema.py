"""The recipe format: a recipe, its steps and how YAML data is validated into them, with positions.

A recipe names a default `base`, `vars`, and `steps` — a mapping of step id to a step. A step holds
exactly one kind key (a registered step kind: see `loraforge.recipes.step_kind`) whose value is that
kind's spec, plus the common keys `output`, `after`, `description`, and `sweep` / `sweep_overrides`, which
expand one step into several (see `loraforge.recipes.sweep`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path  # noqa: F401  (pydantic < 2.6 resolves the annotations of RecipeSource here)
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError, create_model

from loraforge.errors import LoraforgeError, PluginError, RecipeError
from loraforge.plugins import STEP_KINDS
from loraforge.recipes.loader import RecipeSource, load_source
from loraforge.recipes.sweep import check_point_keys, expand_sweeps

STEP_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
DEFAULT_BASE = "builtin:tiny-sd"


class StepCommon(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    output: Optional[str] = Field(None, description="Registry name of the output (default: RECIPE-STEP).")
    after: list[str] = Field(default_factory=list, description="Extra step ids this step waits for.")
    description: Optional[str] = None
    sweep: Optional[dict[str, list[Any]]] = Field(
        None, description="KEY: [values]: one step per point of the product of the lists (see docs/recipes.md).")
    sweep_overrides: Optional[dict[str, dict[str, Any]]] = Field(
        None, description="METHOD: {KEY: value}: keys set for the sweep points of one swept method.")


COMMON_KEYS = set(StepCommon.model_fields)


@lru_cache(maxsize=None)
def _step_model(name: str, spec_class: type[BaseModel]) -> type[StepCommon]:
    """The pydantic model of a whole `NAME:` step: the common keys plus the kind's spec under its name."""
    return create_model(f"{name}_step", __base__=StepCommon, spec=(spec_class, Field(alias=name)))


@dataclass(frozen=True)
class StepDefaults:
    """What a recipe supplies to the specs of its steps when they leave it out."""

    base: str
    recipe_name: str
    step_id: str


class Step(BaseModel):
    """One validated step: its id, kind name, spec and common keys."""

    model_config = ConfigDict(frozen=True)
    id: str
    kind: str
    spec: BaseModel
    output: Optional[str] = None
    after: tuple[str, ...] = ()
    description: Optional[str] = None
    swept_from: Optional[str] = None  # a sweep point: the id of the step as written
    sweep_values: tuple[tuple[str, Any], ...] = ()  # a sweep point: its values, in sweep order

    @property
    def definition(self):
        """The registered StepKind of this step (an instance; it holds no state)."""
        return STEP_KINDS.get(self.kind)()

    def output_kind(self) -> Optional[str]:
        """The artifact kind this step registers (None: unknown until it runs, or nothing)."""
        return self.definition.output_kind(self.spec)

    def references(self) -> list[tuple[tuple, str, Optional[str]]]:
        """(location inside the step, role, value) of every reference: role is model, adapter, path…"""
        return [((self.kind, *ref.loc), ref.role, ref.value) for ref in self.definition.references(self.spec)]


class Recipe(BaseModel):
    """A validated recipe: its source, name, default base and steps in file order."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    source: SkipValidation[RecipeSource] = Field(exclude=True)  # the parsed file, kept for error positions
    name: str
    description: Optional[str] = None
    base: str = DEFAULT_BASE
    vars: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, Step]
    sweeps: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # swept step id → its point ids

    def output_name(self, step: Step) -> str:
        return step.output or f"{self.name}-{step.id}"


class _Top(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, description="Recipe name (default: the file name); prefixes default output names.")
    description: Optional[str] = None
    base: str = Field(DEFAULT_BASE, description="Default base model of every step.")
    vars: dict[str, Any] = Field(default_factory=dict, description="Variables for ${NAME}, overridable with --set.")
    steps: dict[str, Any] = Field(description="Step id → step.")
    publish: list[Any] = Field(default_factory=list, description="Artifacts to push to the Hub after they are built.")


def raise_validation(source: RecipeSource, prefix: tuple, exc: ValidationError, alias: dict | None = None) -> None:
    """Raise the first problem of `exc` as a RecipeError at its position in the file."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple((alias or {}).get(p, p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown field {loc[-1]!r}"
    elif first["type"] == "missing":
        message = "field required"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        message += f" (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    raise source.error(prefix + loc, message + more)


def parse_recipe(source: RecipeSource) -> Recipe:
    """Validate the data of `source` into a Recipe; the first problem raises RecipeError with its position."""
    try:
        top = _Top.model_validate(source.data)
    except ValidationError as exc:
        raise_validation(source, (), exc)
    name = top.name or source.path.stem.split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", name):
        raise source.error(("name",), f"invalid recipe name {name!r}: use letters, digits, '.', '_', '-'")
    expanded = expand_sweeps(source, top.steps, top.publish, STEP_KINDS.names())
    steps: dict[str, Step] = {}
    for step_id, raw in expanded.steps.items():
        point = expanded.points.get(step_id)
        step = parse_step(source, step_id, raw, generated=point is not None)
        if point is not None:
            step = step.model_copy(update={"swept_from": point.step, "sweep_values": point.values})
        steps[step_id] = step
    for swept_id, point_ids in expanded.sweeps.items():
        check_point_keys(source, swept_id, [steps[p] for p in point_ids],
                         {p: expanded.steps[p][steps[p].kind] for p in point_ids}, expanded.origins)
    publish = _kind_class("publish")
    for i, raw in enumerate(expanded.publish):
        step_id = f"publish-{i + 1}"
        loc = ("publish", i)
        if step_id in steps:
            raise source.error(loc, f"step id {step_id!r} is reserved for the recipe's publish list")
        try:
            spec = publish.spec_class.model_validate(raw)
        except ValidationError as exc:
            raise_validation(source, loc, exc)
        steps[step_id] = Step(id=step_id, kind="publish", spec=spec)
    steps = {sid: _with_defaults(step, StepDefaults(top.base, name, sid)) for sid, step in steps.items()}
    recipe = Recipe(source=source, name=name, description=top.description, base=top.base,
                    vars=top.vars, steps=steps, sweeps=expanded.sweeps)
    check_output_names(recipe)
    for step in recipe.steps.values():
        kind = step.definition
        check_plugin_names(recipe, step, kind)
        kind.check(recipe, step)
    return recipe


def _kind_class(name: str) -> type:
    """The StepKind class registered as `name` (a plugin without a pydantic spec_class is refused)."""
    cls = STEP_KINDS.get(name)
    spec_class = getattr(cls, "spec_class", None)
    if not (isinstance(spec_class, type) and issubclass(spec_class, BaseModel) and callable(getattr(cls, "run", None))):
        raise PluginError(f"step kind {name!r} from {STEP_KINDS.info(name).source} is not a StepKind "
                          "(a class with a pydantic spec_class and run); fix or uninstall that package")
    return cls


def _with_defaults(step: Step, defaults: StepDefaults) -> Step:
    return step.model_copy(update={"spec": step.definition.with_defaults(step.spec, defaults)})


def parse_step(source: RecipeSource, step_id: str, raw: Any, generated: bool = False) -> Step:
    """Validate one step; `generated`: a sweep point, whose id is made of its step's id and values."""
    loc = ("steps", step_id)
    names = STEP_KINDS.names()
    if not generated and not STEP_ID_RE.match(step_id):
        raise source.error(loc, f"invalid step id {step_id!r}: start with a letter; use letters, digits, '_', '-'")
    if not isinstance(raw, dict):
        raise source.error(loc, f"a step is a mapping with one of {', '.join(names)} (got {type(raw).__name__})")
    kinds = [k for k in raw if k in names]
    if len(kinds) != 1:
        unknown = [k for k in raw if k not in names and k not in COMMON_KEYS]
        if not kinds and unknown:
            raise source.error(loc + (unknown[0],), f"unknown step kind {unknown[0]!r}: "
                                                    f"choose one of {', '.join(names)}")
        if not kinds:
            raise source.error(loc, f"step has no kind: add one of {', '.join(names)}")
        raise source.error(loc + (kinds[1],), f"step has two kinds ({kinds[0]} and {kinds[1]}): split it in two steps")
    kind = kinds[0]
    try:
        parsed = _step_model(kind, _kind_class(kind).spec_class).model_validate(raw)
    except ValidationError as exc:
        raise_validation(source, loc, exc, alias={"spec": kind})
    return Step(id=step_id, kind=kind, spec=parsed.spec, output=parsed.output, after=tuple(parsed.after),
                description=parsed.description)


def check_output_names(recipe: Recipe) -> None:
    """Every step's output name (given, or RECIPE-STEP) is one the registry accepts."""
    from loraforge.registry.refs import check_name

    for step in recipe.steps.values():
        if not step.definition.makes_artifact:
            continue
        name = recipe.output_name(step)
        try:
            check_name(name)
        except LoraforgeError as exc:
            where = ("steps", step.id, "output") if step.output is not None else ("steps", step.id)
            fix = "" if step.output is not None else "; give the step an `output:` name, or shorten the recipe name"
            raise recipe.source.error(where, f"{exc}{fix}") from None


def check_plugin_names(recipe: Recipe, step: Step, kind) -> None:
    """Every plugin a step names (its method, trainer…) exists in its group (an empty group accepts none)."""
    for group, name in kind.plugins(step.spec):
        loc = ("steps", step.id, step.kind, "method")
        try:
            names = group.names()
        except PluginError as exc:
            raise recipe.source.error(loc, str(exc)) from None
        if name not in names:
            known = ", ".join(names) or "none installed"
            raise recipe.source.error(loc, f"unknown {group.description} {name!r}: choose one of {known}")


def load_recipe(path, overrides: dict | None = None) -> Recipe:
    """Read, substitute and validate a recipe file (no registry access: references resolve in plan.make_plan)."""
    return parse_recipe(load_source(path, overrides))


__all__ = ["Recipe", "RecipeError", "Step", "StepDefaults", "load_recipe", "parse_recipe"]
