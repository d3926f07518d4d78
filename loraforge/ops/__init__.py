"""The numeric engine: streamed checkpoint merges, exact low-rank LoRA algebra, fuse, extract, resize.

Entry points used by the CLI and by recipes (all register their output when `name` is given, or write
`output` without registering; `recipe` and `input_digest` are recorded in provenance):

    merge_checkpoints(registry, spec: CheckpointMergeSpec, *, name=None, output=None, recipe=None, input_digest=None)
    merge_loras(registry, spec: LoraMergeSpec, *, name, recipe=None, input_digest=None) -> Manifest
    fuse_loras(registry, spec: FuseSpec, *, name=None, output=None, recipe=None, input_digest=None)
"""

from loraforge.ops.specs import AdapterInput, CheckpointMergeSpec, FuseSpec, LoraMergeSpec, ModelInput

__all__ = ["AdapterInput", "CheckpointMergeSpec", "FuseSpec", "LoraMergeSpec", "ModelInput"]
