"""`synthetic:` steps: seeded random demo inputs — a perturbed checkpoint or a random LoRA/slider.

They exist so example recipes run offline from a fresh clone; their outputs are labelled
`synthetic:*` in provenance and are not trained on anything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from loraforge.home import tmp_dir
from loraforge.plugins import STEP_KINDS
from loraforge.recipes.step_kind import Spec, SpecReference, StepContext, StepDefaults, StepKind, fill_base
from loraforge.registry.manifest import BaseInfo, Manifest, Parent, Provenance
from loraforge.synthetic import DEFAULT_TARGETS


class SyntheticSpec(Spec):
    """Seeded random demo inputs (clearly not trained): a perturbed checkpoint or a random adapter."""

    kind: Literal["checkpoint", "lora", "slider"] = Field(description="What to make.")
    base: Optional[str] = Field(None, description="Checkpoint to perturb, or the base the adapter fits (default: recipe base).")
    seed: int = Field(0, description="Random seed.")
    scale: float = Field(0.02, ge=0, description="checkpoint: std of the Gaussian noise added to every weight.")
    rank: int = Field(4, ge=1, description="lora/slider: rank.")
    std: float = Field(0.1, gt=0, description="lora/slider: std of both random factors.")
    targets: list[str] = Field(list(DEFAULT_TARGETS), description="lora/slider: UNet modules that get a LoRA.")


@STEP_KINDS.register("synthetic")
class SyntheticStep(StepKind):
    """Seeded random demo inputs: a perturbed checkpoint or a random LoRA/slider."""

    spec_class = SyntheticSpec

    def output_kind(self, spec: SyntheticSpec) -> str:
        return spec.kind

    def references(self, spec: SyntheticSpec) -> list[SpecReference]:
        return [SpecReference(("base",), "model", spec.base)]

    def with_defaults(self, spec: SyntheticSpec, defaults: StepDefaults) -> SyntheticSpec:
        return fill_base(spec, defaults)

    def run(self, ctx: StepContext) -> Manifest:
        from loraforge.registry.resolve import resolve_base

        spec = ctx.spec
        base = resolve_base(ctx.registry, spec.base)
        parent = Parent(ref=base.ref, digest=base.digest, role="base")
        if spec.kind == "checkpoint":
            return _checkpoint(ctx, base, parent)
        return _adapter(ctx, base, parent)


def _checkpoint(ctx: StepContext, base, parent: Parent) -> Manifest:
    from loraforge.errors import ConfigError
    from loraforge.synthetic import perturbed_checkpoint

    spec = ctx.spec
    if base.layout != "diffusers":
        raise ConfigError(f"synthetic checkpoint: {spec.base} is a single file; perturb a diffusers folder model")
    with tempfile.TemporaryDirectory(dir=tmp_dir(ctx.registry.home), prefix="synthetic-") as tmp:
        out = perturbed_checkpoint(Path(base.path), Path(tmp) / "model", seed=spec.seed, scale=spec.scale)
        files = [(p, p.relative_to(out).as_posix()) for p in sorted(out.rglob("*")) if p.is_file()]
        manifest = Manifest(
            name=ctx.output, kind="checkpoint", digest="", files=[], layout="diffusers",
            base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
            provenance=Provenance(method="synthetic:perturb", params={"seed": spec.seed, "scale": spec.scale}),
        )
        manifest = ctx.stamp(manifest, parents=[parent])
        return ctx.registry.register(manifest, files, input_digest=ctx.input_digest)


def _adapter(ctx: StepContext, base, parent: Parent) -> Manifest:
    from loraforge.models.builtin import ensure_builtin
    from loraforge.models.targets import module_shapes
    from loraforge.registry.importer import adapter_info, register_adapter
    from loraforge.registry.manifest import SliderInfo
    from loraforge.synthetic import random_lora

    spec = ctx.spec
    from loraforge.families import family

    folder = Path(base.path) if base.layout == "diffusers" else ensure_builtin(family(base.family).builtins[0],
                                                                               ctx.registry.home)
    state = random_lora(module_shapes(folder), rank=spec.rank, seed=spec.seed, std=spec.std, targets=spec.targets)
    manifest = Manifest(
        name=ctx.output, kind=spec.kind, digest="", files=[], adapter=adapter_info(state, "loraforge"),
        slider=SliderInfo(method="imported", concept="synthetic") if spec.kind == "slider" else None,
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
        provenance=Provenance(method="synthetic:random_lora",
                              params={"seed": spec.seed, "rank": spec.rank, "std": spec.std, "targets": spec.targets}),
    )
    manifest = ctx.stamp(manifest, parents=[parent])
    return register_adapter(ctx.registry, state, manifest, input_digest=ctx.input_digest)
