"""The recipe format: pydantic models of a recipe and of each step kind, validated with YAML positions.

A recipe names a default `base`, `vars`, and `steps` — a mapping of step id to a step. A step holds
exactly one kind key (merge, lora_merge, stack, train, render, synthetic, import, publish) whose
value is that kind's spec, plus the common keys `output`, `after` and `description`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraforge.errors import LoraforgeError, PluginError, RecipeError
from loraforge.ops.specs import AdapterInput, CheckpointMergeSpec, DType, LoraMergeSpec
from loraforge.recipes.loader import RecipeSource, step_ref
from loraforge.synthetic import DEFAULT_TARGETS

STEP_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
DEFAULT_BASE = "builtin:tiny-sd"


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StackSpec(Spec):
    base: Optional[str] = Field(None, description="Checkpoint the adapters sit on (default: the recipe's base).")
    adapters: list[AdapterInput] = Field(min_length=1, description="Adapters with weights (a slider's weight is its scale).")
    fuse: bool = Field(False, description="Bake the stack into a checkpoint instead of combining it into one LoRA.")
    method: str = Field("concat", description="LoRA merge method when not fused; concat keeps the exact sum.")
    rank: Optional[int] = Field(None, gt=0, description="Target rank of the combined LoRA (svd/ties/dare).")
    dtype: DType = Field("fp16", description="Dtype of a fused checkpoint.")


class SweepSpec(Spec):
    adapter: str = Field(description="The adapter or slider whose weight varies across the grid's columns.")
    scales: list[float] = Field(min_length=1, description="Weights (a slider's scales), one column each.")
    label: Optional[str] = Field(None, description="Column label prefix (default: the adapter's reference).")


class RenderSpec(Spec):
    base: Optional[str] = Field(None, description="Checkpoint to render with (default: the recipe's base).")
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
            from loraforge.render.illusion import get_view

            for view in self.views:
                get_view(view)
            if self.sweep is not None:
                raise ValueError("an illusion render (views) cannot also sweep an adapter; use two render steps")
            for prompt in self.prompts:
                parts = [p for p in prompt.split("|") if p.strip()]
                if len(parts) != len(self.views):
                    raise ValueError(f"illusion prompt {prompt!r} has {len(parts)} part(s) for {len(self.views)} "
                                     "views; give one prompt per view separated by '|'")
        return self


class TrainSpec(BaseModel):
    """`method` picks a trainer; every other key is that trainer's config (checked against it)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    method: str = Field(description="Trainer name (see `loraforge methods`).")


class PublishSpec(BaseModel):
    """Push an artifact to the Hub; extra keys are passed to the Hub client."""

    model_config = ConfigDict(frozen=True, extra="allow")
    artifact: str = Field(description="Artifact to push: `${step}` or a registry reference.")
    repo: str = Field(description="Hub repository, org/name.")
    private: bool = False

    @model_validator(mode="after")
    def _push_accepts_it(self) -> "PublishSpec":
        # The Hub push's own checks, so `validate` refuses what `apply` would refuse after building.
        try:
            from loraforge.hub.push import check_publish_options
            from loraforge.reference import check_hub_repo
        except ImportError as exc:
            raise ValueError(f"cannot check a publish entry: the Hub code (loraforge.hub) does not import "
                             f"({exc}); reinstall loraforge with its dependencies") from None
        try:
            check_hub_repo(self.repo)
            check_publish_options(self.model_extra or {})
        except LoraforgeError as exc:
            raise ValueError(str(exc)) from None
        return self


class SyntheticSpec(Spec):
    """Seeded random demo inputs (clearly not trained): a perturbed checkpoint or a random adapter."""

    kind: Literal["checkpoint", "lora", "slider"] = Field(description="What to make.")
    base: Optional[str] = Field(None, description="Checkpoint to perturb, or the base the adapter fits (default: recipe base).")
    seed: int = Field(0, description="Random seed.")
    scale: float = Field(0.02, ge=0, description="checkpoint: std of the Gaussian noise added to every weight.")
    rank: int = Field(4, ge=1, description="lora/slider: rank.")
    std: float = Field(0.1, gt=0, description="lora/slider: std of both random factors.")
    targets: list[str] = Field(list(DEFAULT_TARGETS), description="lora/slider: UNet modules that get a LoRA.")


class ImportSpec(Spec):
    path: str = Field(description="Local file or folder to import (its content digest is tracked).")
    kind: Optional[Literal["lora", "slider", "checkpoint", "dataset"]] = Field(None, description="Default: detected.")
    base: Optional[str] = Field(None, description="Base model an adapter is checked against.")


class StepCommon(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    output: Optional[str] = Field(None, description="Registry name of the output (default: RECIPE-STEP).")
    after: list[str] = Field(default_factory=list, description="Extra step ids this step waits for.")
    description: Optional[str] = None


class MergeStep(StepCommon):
    merge: CheckpointMergeSpec


class LoraMergeStep(StepCommon):
    lora_merge: LoraMergeSpec


class StackStep(StepCommon):
    stack: StackSpec


class TrainStep(StepCommon):
    train: TrainSpec


class RenderStep(StepCommon):
    render: RenderSpec


class SyntheticStep(StepCommon):
    synthetic: SyntheticSpec


class ImportStep(StepCommon):
    import_: ImportSpec = Field(alias="import")


class PublishStep(StepCommon):
    publish: PublishSpec


STEP_MODELS: dict[str, type[StepCommon]] = {
    "merge": MergeStep, "lora_merge": LoraMergeStep, "stack": StackStep, "train": TrainStep,
    "render": RenderStep, "synthetic": SyntheticStep, "import": ImportStep, "publish": PublishStep,
}
STEP_KINDS = tuple(STEP_MODELS)
COMMON_KEYS = set(StepCommon.model_fields)


class Step(BaseModel):
    """One validated step: its id, kind, spec and common keys."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    id: str
    kind: str
    spec: Any
    output: Optional[str] = None
    after: tuple[str, ...] = ()
    description: Optional[str] = None

    def output_kind(self) -> Optional[str]:
        """The artifact kind this step registers (None: unknown until it runs, or nothing)."""
        if self.kind == "merge":
            return "checkpoint"
        if self.kind == "lora_merge":
            return "lora"
        if self.kind == "stack":
            return "checkpoint" if self.spec.fuse else "lora"
        if self.kind == "render":
            return "image"
        if self.kind == "synthetic":
            return self.spec.kind
        if self.kind == "import":
            return self.spec.kind
        if self.kind == "train":
            return "adapter"
        return None

    def references(self) -> list[tuple[tuple, str, str]]:
        """(location inside the step, role, value) of every reference: role is model, adapter or path."""
        spec, k = self.spec, self.kind
        out: list[tuple[tuple, str, str]] = []
        if k == "merge":
            out += [((k, "models", i, "ref"), "model", m.ref) for i, m in enumerate(spec.models)]
        elif k == "lora_merge":
            out += [((k, "adapters", i, "ref"), "adapter", a.ref) for i, a in enumerate(spec.adapters)]
        elif k == "stack":
            out.append(((k, "base"), "model", spec.base))
            out += [((k, "adapters", i, "ref"), "adapter", a.ref) for i, a in enumerate(spec.adapters)]
        elif k == "render":
            out.append(((k, "base"), "model", spec.base))
            out += [((k, "adapters", i, "ref"), "adapter", a.ref) for i, a in enumerate(spec.adapters)]
            if spec.sweep is not None:
                out.append(((k, "sweep", "adapter"), "adapter", spec.sweep.adapter))
        elif k == "synthetic":
            out.append(((k, "base"), "model", spec.base))
        elif k == "import":
            out.append(((k, "path"), "path", spec.path))
            if spec.base:
                out.append(((k, "base"), "model", spec.base))
        elif k == "publish":
            out.append(((k, "artifact"), "artifact", spec.artifact))
        elif k == "train":
            for key, value in train_fields(spec).items():
                out += _train_refs((k, key), key, value)
        return out


def train_fields(spec: TrainSpec) -> dict[str, Any]:
    """The trainer config of a train spec: every key but `method`."""
    return dict(spec.model_extra or {})


def _train_refs(loc: tuple, key: str, value: Any) -> list[tuple[tuple, str, str]]:
    from loraforge.recipes.digest import is_local_path

    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _train_refs(loc + (k,), k, v)]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in _train_refs(loc + (i,), key, v)]
    if not isinstance(value, str):
        return []
    if key == "base" and len(loc) == 2:
        return [(loc, "model", value)]
    if step_ref(value) or is_local_path(value):
        return [(loc, "path" if is_local_path(value) else "any", value)]
    return []


class Recipe(BaseModel):
    """A validated recipe: its source, name, default base and steps in file order."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    source: Any = Field(exclude=True)
    name: str
    description: Optional[str] = None
    base: str = DEFAULT_BASE
    vars: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, Step]

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


def _raise_validation(source: RecipeSource, prefix: tuple, exc: ValidationError, alias: dict | None = None) -> None:
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
        _raise_validation(source, (), exc)
    name = top.name or source.path.stem.split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", name):
        raise source.error(("name",), f"invalid recipe name {name!r}: use letters, digits, '.', '_', '-'")
    steps: dict[str, Step] = {}
    for step_id, raw in top.steps.items():
        steps[str(step_id)] = parse_step(source, str(step_id), raw)
    for i, raw in enumerate(top.publish):
        step_id = f"publish-{i + 1}"
        loc = ("publish", i)
        if step_id in steps:
            raise source.error(loc, f"step id {step_id!r} is reserved for the recipe's publish list")
        try:
            spec = PublishSpec.model_validate(raw)
        except ValidationError as exc:
            _raise_validation(source, loc, exc)
        steps[step_id] = Step(id=step_id, kind="publish", spec=spec)
    steps = {sid: _with_defaults(step, top.base, name) for sid, step in steps.items()}
    recipe = Recipe(source=source, name=name, description=top.description, base=top.base,
                    vars=top.vars, steps=steps)
    check_output_names(recipe)
    check_methods(recipe)
    return recipe


def _with_defaults(step: Step, base: str, recipe_name: str) -> Step:
    """Fill the recipe's base (and a render title) into specs that leave them out."""
    spec = step.spec
    if step.kind in ("stack", "render", "synthetic") and spec.base is None:
        spec = spec.model_copy(update={"base": base})
    if step.kind == "render" and spec.title is None:
        spec = spec.model_copy(update={"title": f"{recipe_name} / {step.id}"})
    if step.kind == "train" and "base" not in (spec.model_extra or {}):
        spec = TrainSpec.model_validate({**spec.model_dump(), "base": base})
    return step.model_copy(update={"spec": spec})


def parse_step(source: RecipeSource, step_id: str, raw: Any) -> Step:
    loc = ("steps", step_id)
    if not STEP_ID_RE.match(step_id):
        raise source.error(loc, f"invalid step id {step_id!r}: start with a letter; use letters, digits, '_', '-'")
    if not isinstance(raw, dict):
        raise source.error(loc, f"a step is a mapping with one of {', '.join(STEP_KINDS)} (got {type(raw).__name__})")
    kinds = [k for k in raw if k in STEP_MODELS]
    if len(kinds) != 1:
        unknown = [k for k in raw if k not in STEP_MODELS and k not in COMMON_KEYS]
        if not kinds and unknown:
            raise source.error(loc + (unknown[0],), f"unknown step kind {unknown[0]!r}: "
                                                    f"choose one of {', '.join(STEP_KINDS)}")
        if not kinds:
            raise source.error(loc, f"step has no kind: add one of {', '.join(STEP_KINDS)}")
        raise source.error(loc + (kinds[1],), f"step has two kinds ({kinds[0]} and {kinds[1]}): split it in two steps")
    kind = kinds[0]
    model = STEP_MODELS[kind]
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        _raise_validation(source, loc, exc, alias={"import_": "import"})
    spec = getattr(parsed, "import_" if kind == "import" else kind)
    return Step(id=step_id, kind=kind, spec=spec, output=parsed.output, after=tuple(parsed.after),
                description=parsed.description)


def check_output_names(recipe: Recipe) -> None:
    """Every step's output name (given, or RECIPE-STEP) is one the registry accepts."""
    from loraforge.registry.refs import check_name

    for step in recipe.steps.values():
        if step.kind == "publish":
            continue
        name = recipe.output_name(step)
        try:
            check_name(name)
        except LoraforgeError as exc:
            where = ("steps", step.id, "output") if step.output is not None else ("steps", step.id)
            fix = "" if step.output is not None else "; give the step an `output:` name, or shorten the recipe name"
            raise recipe.source.error(where, f"{exc}{fix}") from None


def check_methods(recipe: Recipe) -> None:
    """Method names exist in their plugin group (an empty group accepts none)."""
    from loraforge.plugins import LORA_METHODS, MERGE_METHODS, TRAINERS

    source = recipe.source
    for step in recipe.steps.values():
        loc = ("steps", step.id, step.kind, "method")
        group, method = None, None
        if step.kind == "merge":
            group, method = MERGE_METHODS, step.spec.method
        elif step.kind == "lora_merge" or (step.kind == "stack" and not step.spec.fuse):
            group, method = LORA_METHODS, step.spec.method
        elif step.kind == "train":
            group, method = TRAINERS, step.spec.method
        if group is None:
            continue
        try:
            names = group.names()
        except PluginError as exc:
            raise source.error(loc, str(exc)) from None
        if method not in names:
            known = ", ".join(names) or "none installed"
            raise source.error(loc, f"unknown {group.description} {method!r}: choose one of {known}")
        if step.kind == "train":
            check_train_config(recipe, step)
        elif step.kind in ("merge", "lora_merge"):
            check_method_params(recipe, step, group)


def check_method_params(recipe: Recipe, step: Step, group) -> None:
    """A merge step's `params:` checked by its method's Params model, with the parameter's position."""
    from loraforge.ops.method_params import method_params

    try:
        method_params(group.description, step.spec.method, group.get(step.spec.method), step.spec.params)
    except LoraforgeError as exc:
        loc = ("steps", step.id, step.kind, "params") + ((exc.param,) if getattr(exc, "param", None) else ())
        raise recipe.source.error(loc, str(exc)) from None


def check_train_config(recipe: Recipe, step: Step) -> Any:
    """The trainer's config for a train step (step references left as written)."""
    from loraforge.plugins import TRAINERS

    fields = train_fields(step.spec)
    fields.setdefault("base", recipe.base)
    cls = TRAINERS.get(step.spec.method)
    try:
        return cls.config_class.model_validate(fields)
    except ValidationError as exc:
        _raise_validation(recipe.source, ("steps", step.id, "train"), exc)
    except (TypeError, ValueError) as exc:
        raise recipe.source.error(("steps", step.id, "train"), str(exc)) from None


def load_recipe(path, overrides: dict | None = None) -> Recipe:
    """Read, substitute and validate a recipe file (no registry access: see graph.validate_recipe)."""
    from loraforge.recipes.loader import load_source

    return parse_recipe(load_source(path, overrides))


__all__ = ["Recipe", "RecipeError", "Step", "STEP_KINDS", "load_recipe", "parse_recipe"]
