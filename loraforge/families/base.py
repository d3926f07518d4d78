"""The `Family` description and the registry of families by name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from loraforge.errors import ConfigError, IncompatibleBaseError

# Every component an adapter may change, over all families, in canonical order (the denoisers first).
ADAPTER_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Family:
    """One architecture loraforge adapts."""

    name: str  # "sd1" | "sdxl" | "flux": what manifests and locks record
    label: str  # how messages name it: "SD1.x", "SDXL", "Flux"
    pipeline_class: str  # the diffusers pipeline class
    denoiser: str  # "unet" | "transformer": the component that predicts noise or velocity
    text_encoders: tuple[str, ...]  # pipeline components, in pipeline order
    text_encoder_kinds: tuple[str, ...]  # "clip" | "clip_g" | "t5", one per text encoder
    prediction: str  # "epsilon" (DDPM noise) | "flow" (rectified-flow velocity)
    builtins: tuple[str, ...]  # builtin models of the family, the first the default test model
    hub_tags: tuple[str, ...]  # model-card tags besides lora/loraforge
    # Hub ids of the standard bases, for model cards and messages.
    standard_bases: tuple[str, ...] = ()
    # Block groups that block weights and merges address: group name -> the denoiser path prefix of its blocks.
    block_groups: dict[str, str] = field(default_factory=dict)
    # What a checkpoint merge merges unless told (`--include`): the rest is copied from the first model.
    merge_components: tuple[str, ...] = ()

    @property
    def adapter_components(self) -> tuple[str, ...]:
        """The components an adapter of this family may change: the denoiser and the text encoders."""
        return (self.denoiser, *self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """The weighted components of a pipeline of this family: denoiser, VAE, text encoders."""
        return (self.denoiser, "vae", *self.text_encoders)

    @property
    def is_transformer(self) -> bool:
        return self.denoiser == "transformer"

    def __str__(self) -> str:
        return self.label


FAMILIES: dict[str, Family] = {}


def register_family(fam: Family) -> Family:
    if fam.name in FAMILIES:
        raise ValueError(f"model family {fam.name!r} is registered twice")
    FAMILIES[fam.name] = fam
    return fam


def family(name: str | Family) -> Family:
    """The family registered as `name`; an unknown name is refused in one line listing the known ones."""
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def describe(name: str | None) -> str:
    """A family's label for messages ("SDXL"), the name itself when unknown, "unknown" for None."""
    if name is None:
        return "unknown"
    return FAMILIES[name].label if name in FAMILIES else str(name)


def family_of_components(components: Iterable[str]) -> Family | None:
    """The family whose pipelines hold these components (an adapter's or a base's): `transformer` is Flux, `unet`
    with `text_encoder_2` SDXL, a `unet` alone SD1; text encoders alone tell nothing (None)."""
    components = set(components)
    if "transformer" in components:
        return FAMILIES["flux"]
    if "unet" in components:
        return FAMILIES["sdxl" if "text_encoder_2" in components else "sd1"]
    return None


def check_same_family(adapter_family: str | None, base_family: str | None, adapter: str, base: str) -> None:
    """Refuse, in one line naming both families, an adapter made for another family than the base's; a side
    whose family is unknown (None) is not judged here (its modules are still checked against the base)."""
    if adapter_family is None or base_family is None or adapter_family == base_family:
        return
    a, b = family(adapter_family), family(base_family)
    if a.denoiser == b.denoiser and {a.name, b.name} <= {"sd1", "sdxl"}:
        return  # SD1 vs SDXL is told by module shapes, which name the first layer that differs
    raise IncompatibleBaseError(
        f"{adapter} is a {a.label} adapter but {base} is a {b.label} base ({b.pipeline_class}); "
        f"use it with a {a.label} base" + (f" such as builtin:{a.builtins[0]}" if a.builtins else ""))
