"""`train:` steps: any registered trainer, resumed from its checkpoints when a previous run was cut off."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraforge.errors import RecipeError
from loraforge.plugins import REWARDS, STEP_KINDS, TRAINERS
from loraforge.recipes.schema import Recipe, Step, raise_validation
from loraforge.recipes.step_kind import SpecReference, StepContext, StepDefaults, StepKind, nested_references


class TrainSpec(BaseModel):
    """`method` picks a trainer; every other key is that trainer's config (checked against it)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    method: str = Field(description="Trainer name (see `loraforge methods`).")


def train_fields(spec: TrainSpec) -> dict[str, Any]:
    """The trainer config of a train spec: every key but `method`."""
    return dict(spec.model_extra or {})


@STEP_KINDS.register("train")
class TrainStep(StepKind):
    """Train an adapter with a registered trainer."""

    spec_class = TrainSpec

    def output_kind(self, spec: TrainSpec) -> str:
        # What the trainer registers: "adapter" (a LoRA or a slider, known once it ran) unless the trainer says
        # (full DreamBooth makes a checkpoint, so `base: ${step}` may name it; textual inversion an embedding).
        if spec.method in TRAINERS:
            return getattr(TRAINERS.get(spec.method), "artifact_kind", "adapter")
        return "adapter"

    def references(self, spec: TrainSpec) -> list[SpecReference]:
        refs: list[SpecReference] = []
        for key, value in train_fields(spec).items():
            if key == "base" and isinstance(value, str):
                refs.append(SpecReference((key,), "model", value))
            else:
                refs += nested_references((key,), key, value)
        return refs

    def with_defaults(self, spec: TrainSpec, defaults: StepDefaults) -> TrainSpec:
        if "base" in train_fields(spec):
            return spec
        return TrainSpec.model_validate({**spec.model_dump(), "base": defaults.base})

    def plugins(self, spec: TrainSpec):
        found = [(TRAINERS, spec.method)]
        reward = train_fields(spec).get("reward")
        if isinstance(reward, str):  # a reward trainer's numbers also depend on its reward's version
            name = reward.strip()
            found.append((REWARDS, "python" if name.startswith("python:") else name))
        return found

    def spec_keys(self, spec: TrainSpec):
        if spec.method not in TRAINERS:
            return None  # an unknown method is reported by name, with the installed ones
        fields = TRAINERS.get(spec.method).config_class.model_fields
        return {"method"} | set(fields) | {f.alias for f in fields.values() if f.alias}

    def check(self, recipe: Recipe, step: Step) -> None:
        """The trainer's config accepts the step's keys (step references left as written)."""
        fields = train_fields(step.spec)
        fields.setdefault("base", recipe.base)
        cls = TRAINERS.get(step.spec.method)
        try:
            cls.config_class.model_validate(fields)
        except ValidationError as exc:
            raise_validation(recipe.source, ("steps", step.id, "train"), exc)
        except (TypeError, ValueError) as exc:
            raise recipe.source.error(("steps", step.id, "train"), str(exc)) from None

    def run(self, ctx: StepContext):
        method = ctx.spec.method
        if method not in TRAINERS:
            known = ", ".join(TRAINERS.names()) or "none installed"
            raise RecipeError(f"trainer {method!r} is not installed (available: {known})")
        cls = TRAINERS.get(method)
        try:
            config = cls.config_class.model_validate(train_fields(ctx.spec))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise RecipeError(f"train.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        manifests = cls().train(config, registry=ctx.registry, output=ctx.output, recipe=ctx.recipe_info,
                                input_digest=ctx.input_digest, resume=True)
        if not manifests:
            raise RecipeError(f"trainer {method!r} registered nothing")
        # The step's output is the artifact named like the step's output (others are side products).
        return next((m for m in manifests if m.name == ctx.output), manifests[0])
