"""`publish:` entries: push an artifact to the Hugging Face Hub once the step that makes it succeeded."""

from __future__ import annotations

from loraforge.errors import HubError
from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    try:
        from loraforge.hub.push import publish
    except ImportError as exc:
        # The Hub code ships with loraforge: failing to import it is a broken install, never a reason
        # to report the recipe as done with nothing pushed.
        raise HubError(f"cannot publish {ctx.spec.artifact} to {ctx.spec.repo}: the Hub code "
                       f"(loraforge.hub.push) does not import ({exc}); reinstall loraforge with its "
                       "dependencies (pip install loraforge)") from None
    spec = ctx.spec
    options = {"private": spec.private, **(spec.model_extra or {})}
    result = publish(ctx.registry, spec.artifact, spec.repo, **options)
    ctx.echo(f"published {spec.artifact} to {spec.repo}" + (f" ({result})" if result else ""))
    return None
