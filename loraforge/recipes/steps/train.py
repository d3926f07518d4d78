"""`train:` steps: any registered trainer, resumed from its checkpoints when a previous run was cut off."""

from __future__ import annotations

from loraforge.errors import RecipeError
from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    from pydantic import ValidationError

    from loraforge.plugins import TRAINERS
    from loraforge.recipes.schema import train_fields

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
