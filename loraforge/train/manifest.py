"""Building the manifest of a trained adapter: provenance (method, full config, parents, run id), metrics."""

from __future__ import annotations

from typing import Any, Sequence

from loraforge.registry.manifest import BaseInfo, Manifest, Parent, Provenance, RecipeInfo, SliderInfo


def training_manifest(*, name: str, method: str, config: Any, base, state, datasets: Sequence[Manifest] = (),
                      run_id: str, metrics: dict, training: dict | None = None, recipe: RecipeInfo | None = None,
                      kind: str = "lora", slider: SliderInfo | None = None, extra_parents: Sequence[Parent] = ()) -> Manifest:
    """The manifest `register_adapter` completes with adapter facts and files.

    `config` is the trainer's pydantic config (or a dict); `base` a loraforge.models.base.BaseModel;
    `state` the trained LoraState.
    """
    from loraforge.registry.importer import adapter_info

    params = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
    parents += [Parent(ref=d.ref, digest=d.digest, role="dataset") for d in datasets]
    parents += list(extra_parents)
    facts = {k: params[k] for k in ("steps", "learning_rate", "lr_scheduler", "rank", "alpha", "batch_size",
                                    "gradient_accumulation", "resolution", "seed") if k in params}
    facts.update(training or {})
    return Manifest(
        name=name, kind=kind, digest="", files=[],
        adapter=adapter_info(state, "loraforge"),
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
        slider=slider,
        provenance=Provenance(
            source=f"train:{method}", method=f"train:{method}", params=params, parents=parents, recipe=recipe,
            training=facts, dataset_digest=datasets[0].digest if datasets else None, run_id=run_id,
        ),
        metrics=metrics,
    )
