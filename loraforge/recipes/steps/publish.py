"""`publish:` entries: push an artifact to the Hugging Face Hub once the step that makes it succeeded.

With `gates:` the entry first checks the artifact's recorded metrics (see `loraforge.recipes.gates`)
and waits for the recipe's steps that score it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from loraforge.errors import HubError, LoraforgeError
from loraforge.plugins import STEP_KINDS
from loraforge.recipes.gates import Gate, check_gates, scoring_steps
from loraforge.recipes.loader import step_ref
from loraforge.recipes.schema import Recipe, Step
from loraforge.recipes.step_kind import SpecReference, StepContext, StepKind


class PublishSpec(BaseModel):
    """Push an artifact to the Hub; extra keys are passed to the Hub client."""

    model_config = ConfigDict(frozen=True, extra="allow")
    artifact: str = Field(description="Artifact to push: `${step}` or a registry reference.")
    repo: str = Field(description="Hub repository, org/name.")
    private: bool = False
    gates: dict[str, Gate] = Field(
        default_factory=dict, description="METRIC: {min, max, no_regression_vs: previous, tolerance, better}: "
                                          "scores the artifact needs before it is pushed.")

    @model_serializer(mode="wrap")
    def _without_empty_gates(self, handler):
        # Left out when empty, so a publish entry written before gates existed keeps its input digest.
        data = handler(self)
        if not self.gates and isinstance(data, dict):
            data.pop("gates", None)
        return data

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


def check_not_own_output(recipe: Recipe, artifact: str, loc: tuple) -> None:
    """The latest version of a name a step of this recipe outputs is written as that step's `${step}`.

    As a registry reference it would resolve when the plan is made, before the step builds its new
    version, and the publish would neither wait for the step nor push what the apply built.
    """
    name, _, version = artifact.partition(":")
    if version not in ("", "latest"):
        return
    for other in recipe.steps.values():
        if other.definition.makes_artifact and recipe.output_name(other) == name:
            raise recipe.source.error(loc, f"{artifact} is the output of step {other.id!r}: write "
                                           f"artifact: ${{{other.id}}}, so the publish waits for that step and "
                                           "pushes the version this apply builds")


@STEP_KINDS.register("publish")
class PublishStep(StepKind):
    """Push an artifact to the Hugging Face Hub."""

    spec_class = PublishSpec
    makes_artifact = False

    def references(self, spec: PublishSpec) -> list[SpecReference]:
        return [SpecReference(("artifact",), "artifact", spec.artifact)]

    def check(self, recipe: Recipe, step: Step) -> None:
        """A gate on an artifact the recipe builds needs a step of the recipe that computes its metric."""
        spec = step.spec
        index = int(step.id.split("-")[1]) - 1
        if step_ref(spec.artifact) is None:
            check_not_own_output(recipe, spec.artifact, ("publish", index, "artifact"))
        if not spec.gates or step_ref(spec.artifact) is None:
            return  # a registry artifact may have been scored before (`loraforge eval`)
        scored = scoring_steps(recipe, spec.artifact)
        computed = set().union(*scored.values()) if scored else set()
        for metric in spec.gates:
            if metric in computed:
                continue
            have = (f"; the eval steps scoring it ({', '.join(scored)}) compute {', '.join(sorted(computed))}"
                    if scored else "")
            raise recipe.source.error(("publish", index, "gates", metric),
                                      f"gate on {metric!r}, which no step computes for {spec.artifact}{have}: add an "
                                      f"eval step with refs: [{spec.artifact}] and metrics: [{metric}]")

    def runs_after(self, recipe: Recipe, step: Step) -> list[str]:
        return list(scoring_steps(recipe, step.spec.artifact)) if step.spec.gates else []

    def run(self, ctx: StepContext) -> None:
        try:
            from loraforge.hub.push import publish
        except ImportError as exc:
            # The Hub code ships with loraforge: failing to import it is a broken install, never a reason
            # to report the recipe as done with nothing pushed.
            raise HubError(f"cannot publish {ctx.spec.artifact} to {ctx.spec.repo}: the Hub code "
                           f"(loraforge.hub.push) does not import ({exc}); reinstall loraforge with its "
                           "dependencies (pip install loraforge)") from None
        spec = ctx.spec
        if spec.gates:  # before anything is sent: a blocked version leaves the repo as it was
            check_gates(ctx.registry, spec.artifact, spec.gates, echo=ctx.echo)
        options = {"private": spec.private, **(spec.model_extra or {})}
        result = publish(ctx.registry, spec.artifact, spec.repo, **options)
        ctx.echo(f"published {spec.artifact} to {spec.repo}" + (f" ({result})" if result else ""))
        return None
