"""`publish:` entries: push an artifact to the Hugging Face Hub once the step that makes it succeeded."""

from __future__ import annotations

from loraforge.recipes.steps import StepContext, StepSkipped


def run(ctx: StepContext):
    try:
        from loraforge.hub.push import publish
    except ImportError:
        raise StepSkipped("publish skipped: hub support not installed") from None
    spec = ctx.spec
    options = {"private": spec.private, **(spec.model_extra or {})}
    result = publish(ctx.registry, spec.artifact, spec.repo, **options)
    ctx.echo(f"published {spec.artifact} to {spec.repo}" + (f" ({result})" if result else ""))
    return None
