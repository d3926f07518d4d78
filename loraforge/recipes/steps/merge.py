"""`merge:` steps: a streamed checkpoint merge registered as a checkpoint."""

from __future__ import annotations

from loraforge.ops.specs import CheckpointMergeSpec
from loraforge.plugins import MERGE_METHODS, STEP_KINDS
from loraforge.recipes.step_kind import SpecReference, StepContext, StepKind, check_method_params


@STEP_KINDS.register("merge")
class MergeStep(StepKind):
    """Merge checkpoints with a checkpoint merge method."""

    spec_class = CheckpointMergeSpec

    def output_kind(self, spec: CheckpointMergeSpec) -> str:
        return "checkpoint"

    def references(self, spec: CheckpointMergeSpec) -> list[SpecReference]:
        return [SpecReference(("models", i, "ref"), "model", m.ref) for i, m in enumerate(spec.models)]

    def plugins(self, spec: CheckpointMergeSpec):
        return [(MERGE_METHODS, spec.method)]

    def check(self, recipe, step) -> None:
        check_method_params(recipe, step, MERGE_METHODS)

    def run(self, ctx: StepContext):
        from loraforge.ops.merge import merge_checkpoints

        return merge_checkpoints(ctx.registry, ctx.spec, name=ctx.output, recipe=ctx.recipe_info,
                                 input_digest=ctx.input_digest)
