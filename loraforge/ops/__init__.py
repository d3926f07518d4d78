"""The numeric engine: streamed checkpoint merges, exact low-rank LoRA algebra, fuse, extract, resize.

Entry points used by the CLI and by recipes (all register their output when `name` is given, or write
`output` without registering; `recipe` and `input_digest` are recorded in provenance):

    merge_checkpoints(registry, spec: CheckpointMergeSpec, *, name=None, output=None, recipe=None, input_digest=None)
    merge_loras(registry, spec: LoraMergeSpec, *, name, recipe=None, input_digest=None) -> Manifest
    fuse_loras(registry, spec: FuseSpec, *, name=None, output=None, recipe=None, input_digest=None)
    extract_lora(registry, tuned, base, *, name, rank, rule="fixed", value=None, ...) -> Manifest
    resize_lora(registry, ref, *, name, rank=None, rule="fixed", value=None, ...) -> Manifest
"""

from loraforge.ops.specs import AdapterInput, CheckpointMergeSpec, FuseSpec, LoraMergeSpec, ModelInput, make_spec


def __getattr__(name: str):
    # The engine imports torch; load it only when an entry point is used.
    lazy = {"merge_checkpoints": "loraforge.ops.merge", "merge_loras": "loraforge.ops.lora_merge",
            "fuse_loras": "loraforge.ops.fuse", "extract_lora": "loraforge.ops.extract",
            "resize_lora": "loraforge.ops.resize"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(name)


__all__ = ["AdapterInput", "CheckpointMergeSpec", "FuseSpec", "LoraMergeSpec", "ModelInput", "extract_lora",
           "fuse_loras", "make_spec", "merge_checkpoints", "merge_loras", "resize_lora"]
