"""The in-memory LoRA adapter every converter reads into and writes from.

A `LoraState` maps canonical module names (`unet.<diffusers path>` or, for Flux, `transformer.<diffusers
path>`, `text_encoder.<transformers path>`, `text_encoder_2.<...>`) to `LoraModule`s holding the two factors and alpha exactly as read
(no dtype change), so converting between formats never rounds a weight it does not have to.

The factors are torch tensors, or `RawTensor`s (a file's bytes, read without torch) when an adapter is
only checked and stored: the summaries, checks and the canonical state dict work on both.

A module is a `LoraModule` (a LoRA pair, also LyCORIS' plain LoCon) or one of the typed variants of
`loraforge.formats.variants` (LoHa, LoKr, Tucker LoCon, DoRA, full and norm differences), each keeping its
tensors under the suffixes the file used; `module_from_tensors` picks the one a set of suffixes names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.errors import FormatError, IncompatibleBaseError
from loraforge.families import ADAPTER_COMPONENTS
from loraforge.formats.safetensors_io import DTYPE_SIZES, FLOAT_DTYPES, TORCH_NAMES, RawTensor, all_finite
from loraforge.formats.variants import MAGNITUDE_SUFFIXES, SUFFIXES as VARIANT_SUFFIXES, VARIANTS, Dora, VariantModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# Bits of each float dtype by torch's name (float16 → 16), for the widest-dtype summary.
_FLOAT_BITS = {TORCH_NAMES[d]: 8 * DTYPE_SIZES[d] for d in FLOAT_DTYPES}

COMPONENTS = ADAPTER_COMPONENTS
DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
PAIR_SUFFIXES = frozenset({DOWN_SUFFIX[1:], UP_SUFFIX[1:]})
# Every per-module suffix a canonical file may hold (without the leading dot), longest first for matching.
MODULE_SUFFIXES = tuple(sorted(PAIR_SUFFIXES | VARIANT_SUFFIXES | {ALPHA_SUFFIX[1:]}, key=lambda x: (-len(x), x)))
# Canonical text-encoder paths, like every SD file, keep CLIP's `text_model.` wrapper, which
# transformers 5 dropped from CLIPTextModel (CLIPTextModelWithProjection kept it).
TEXT_MODEL_PREFIX = "text_model."
TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm")
# T5 (Flux's text_encoder_2) has no wrapper; its paths also start with `encoder.` (encoder.block.N...).
T5_ROOTS = ("encoder.block.", "encoder.final_layer_norm", "shared")


def without_text_model(path: str) -> str:
    """A text-encoder module path as transformers 5 names it inside CLIPTextModel."""
    return path.removeprefix(TEXT_MODEL_PREFIX)


def with_text_model(path: str) -> str:
    """A text-encoder module path in canonical form, whichever CLIP layout it was spelled in."""
    return TEXT_MODEL_PREFIX + path if path.startswith(TEXT_MODEL_ROOTS) and not path.startswith(T5_ROOTS) else path


@dataclass
class LoraModule:
    """One LoRA pair: ΔW = (alpha / rank) · up · down."""

    down: Tensor  # A: r×n, or r×in×k×k for a conv layer
    up: Tensor  # B: m×r, or m×r×1×1 for a conv layer
    alpha: float

    variant = "lora"
    needs_base = False
    adapts = "weight"
    records_kernel = True  # a conv pair's down is 4-D

    def __post_init__(self) -> None:
        self.alpha = float(self.alpha)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The factors under their kohya/LyCORIS suffixes."""
        return {DOWN_SUFFIX[1:]: self.down, UP_SUFFIX[1:]: self.up}

    def file_tensors(self) -> dict[str, Tensor]:
        return self.tensors

    @property
    def rank_bound(self) -> int:
        return min(self.rank, self.max_rank)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return tuple(self.weight_shape) == tuple(int(s) for s in shape)

    def cast(self, dtype: torch.dtype) -> LoraModule:
        return LoraModule(self.down.to(dtype), self.up.to(dtype), self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts."""
        if self.is_conv:
            return (int(self.up.shape[0]), *self.down.shape[1:])
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    @property
    def max_rank(self) -> int:
        """min(out, in) of the flattened weight: a higher rank adds nothing but size and cost."""
        return min(int(self.up.shape[0]), math.prod(int(s) for s in self.down.shape[1:]))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(scale·B, A) as 2-D float32 matrices, so ΔW.flatten(1) = B @ A."""
        import torch

        b = self.up.reshape(self.up.shape[0], -1).to(torch.float32) * self.scale
        a = self.down.reshape(self.rank, -1).to(torch.float32)
        return b, a

    def delta(self, dtype: torch.dtype | None = None, base_weight: Tensor | None = None) -> Tensor:
        """Dense ΔW shaped like the base weight (computed in float32, returned in `dtype`, float32 by default);
        `base_weight` is accepted for the variants' sake and not needed."""
        import torch

        b, a = self.factors()
        return (b @ a).reshape(self.weight_shape).to(torch.float32 if dtype is None else dtype)

    def check_shapes(self, name: str) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() != self.down.dim():
            raise FormatError(
                f"LoRA module {name}: down {tuple(self.down.shape)} and up {tuple(self.up.shape)} "
                "are not a linear (2-D) or conv (4-D) pair"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise FormatError(
                f"LoRA module {name}: down has rank {self.down.shape[0]} but up has rank {self.up.shape[1]}"
            )
        if self.up.dim() == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise FormatError(f"LoRA module {name}: conv up weight must be 1×1, got {tuple(self.up.shape)}")


AdapterModule = "LoraModule | VariantModule"


def module_from_tensors(tensors: Mapping[str, Tensor | RawTensor], alpha: float | None, name: str):
    """The module a file's tensors for one layer make (suffix → tensor, `alpha` from its `.alpha` or None):
    a LoraModule for lora_down/lora_up, else the one registered variant whose suffixes they are."""
    suffixes = frozenset(tensors)
    magnitude = suffixes & set(MAGNITUDE_SUFFIXES)
    if magnitude:
        if len(magnitude) > 1:
            raise FormatError(f"module {name} has both {' and '.join(sorted(magnitude))}")
        rest = {k: v for k, v in tensors.items() if k not in magnitude}
        inner = module_from_tensors(rest, alpha, name)
        if inner.variant not in ("lora", "loha", "lokr", "locon_tucker"):
            raise FormatError(f"module {name}: a DoRA magnitude ({min(magnitude)}) on a {inner.variant} module")
        return Dora({k: tensors[k] for k in magnitude}, inner.alpha, inner)
    if suffixes == PAIR_SUFFIXES:
        return LoraModule(down=tensors[DOWN_SUFFIX[1:]], up=tensors[UP_SUFFIX[1:]],
                          alpha=float(tensors[DOWN_SUFFIX[1:]].shape[0]) if alpha is None else alpha)
    claims = [cls for cls in VARIANTS.values() if cls.claims(suffixes)]
    near = [cls for cls in VARIANTS.values() if suffixes & (cls.required | cls.optional)]
    if not claims and len(near) == 1 and suffixes <= near[0].required | near[0].optional:
        cls = near[0]
        raise FormatError(f"module {name} holds {', '.join(sorted(suffixes))}: an incomplete {cls.variant} module "
                          f"({cls.description})")
    if len(claims) != 1:
        known = ", ".join(["lora_down.weight+lora_up.weight", *(f"{v}" for v in sorted(VARIANTS))])
        raise FormatError(f"module {name} holds {', '.join(sorted(suffixes))}, which is no adapter variant "
                          f"loraforge knows ({known})")
    cls = claims[0]
    if not cls.uses_alpha and alpha is not None:
        raise FormatError(f"module {name} is a {cls.variant} module, which has no alpha, but the file gives one")
    return cls(tensors, alpha)


def split_module_key(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a key ending in a known module suffix, else None."""
    for suffix in MODULE_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


class LoraState(MutableMapping[str, LoraModule]):
    """Canonical module name → LoraModule, plus `hints` that let a converter write back the exact
    spelling it read (e.g. kohya's `lora_te1_` prefix); hints never change the numbers."""

    def __init__(self, modules: Mapping[str, LoraModule] | None = None, hints: Mapping[str, str] | None = None):
        self._modules: dict[str, LoraModule] = {}
        self.hints: dict[str, str] = dict(hints or {})
        for name, module in (modules or {}).items():
            self[name] = module

    # -- mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> LoraModule:
        return self._modules[name]

    def __setitem__(self, name: str, module: LoraModule) -> None:
        component = name.split(".", 1)[0]
        if component not in COMPONENTS or "." not in name:
            raise FormatError(
                f"LoRA module name {name!r} must start with one of {', '.join(COMPONENTS)} followed by a module path"
            )
        module.check_shapes(name)
        self._modules[name] = module

    def __delitem__(self, name: str) -> None:
        del self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"LoraState({len(self)} modules, components={self.components}, rank={self.rank})"

    # -- summaries --------------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        return sorted({name.split(".", 1)[0] for name in self._modules})

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self._modules.items()}

    @property
    def rank(self) -> int:
        """The largest rank (the only one when ranks are uniform); 0 when empty."""
        return max(self.ranks.values(), default=0)

    @property
    def uniform_rank(self) -> bool:
        return len(set(self.ranks.values())) <= 1

    @property
    def alphas(self) -> dict[str, float]:
        return {name: m.alpha for name, m in self._modules.items() if m.alpha is not None}

    @property
    def variants(self) -> dict[str, int]:
        """How many modules of each variant (`lora`, `loha`, `dora`, ...) the adapter holds."""
        counts: dict[str, int] = {}
        for m in self._modules.values():
            counts[m.variant] = counts.get(m.variant, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def is_plain_lora(self) -> bool:
        return all(m.variant == "lora" for m in self._modules.values())

    def require_lora_pairs(self, what: str) -> None:
        """Raise FormatError naming the first module that is not a LoRA pair, for code that needs B·A factors."""
        for name in sorted(self._modules):
            m = self._modules[name]
            if m.variant != "lora":
                raise FormatError(f"module {name} is a {m.variant} module, not a LoRA pair, and {what} needs LoRA "
                                  "factors; convert the adapter first with `loraforge lora resize --rank R`")

    @property
    def target_modules(self) -> list[str]:
        """Module names as LoRA configs write them: the last segment, or two when it is an index (to_out.0)."""
        out = set()
        for name in self._modules:
            parts = name.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
        return sorted(out)

    @property
    def dtype(self) -> torch.dtype | str | None:
        """The dtype of the factors; the widest one when they are mixed, None when empty (torch's name
        of it, `float16`, for RawTensor factors)."""
        dtypes = {t.dtype for m in self._modules.values() for t in m.file_tensors().values()}
        if not dtypes:
            return None
        return max(dtypes, key=lambda d: (_FLOAT_BITS.get(str(d).removeprefix("torch."), 0), str(d)))

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for m in self._modules.values() for t in m.file_tensors().values())

    def component(self, name: str) -> dict[str, LoraModule]:
        """Modules of one component, keyed by their path inside it."""
        prefix = name + "."
        return {k[len(prefix):]: m for k, m in self._modules.items() if k.startswith(prefix)}

    # -- canonical state dict ---------------------------------------------------------------
    def to_state_dict(self) -> dict[str, Tensor]:
        sd: dict[str, Tensor] = {}
        for name in sorted(self._modules):
            m = self._modules[name]
            tensors = m.file_tensors()
            for suffix, t in tensors.items():
                sd[f"{name}.{suffix}"] = t.contiguous()
            if m.alpha is not None:
                sd[name + ALPHA_SUFFIX] = _float32_scalar(m.alpha, like=next(iter(tensors.values())))
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], hints: Mapping[str, str] | None = None) -> LoraState:
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in sd.items():
            split = split_module_key(key)
            if split is None:
                raise FormatError(f"unexpected key {key!r} in a loraforge adapter")
            grouped.setdefault(split[0], {})[split[1]] = value
        return cls.from_module_tensors(grouped, hints=hints)

    @classmethod
    def from_module_tensors(cls, grouped: Mapping[str, Mapping[str, Tensor]],
                            hints: Mapping[str, str] | None = None) -> LoraState:
        """A state from {module name: {suffix: tensor}} (suffixes without the leading dot, `alpha` among them)."""
        state = cls(hints=hints)
        for name in sorted(grouped):
            tensors = dict(grouped[name])
            alpha_t = tensors.pop(ALPHA_SUFFIX[1:], None)
            if not tensors:
                raise FormatError(f"{name}{ALPHA_SUFFIX} has no LoRA weights")
            if set(tensors) & PAIR_SUFFIXES and not PAIR_SUFFIXES <= set(tensors):
                have = min(set(tensors) & PAIR_SUFFIXES)
                missing = min(PAIR_SUFFIXES - {have})
                raise FormatError(f"{name}.{have} has no matching {name}.{missing}")
            alpha = alpha_value(alpha_t, name) if alpha_t is not None else None
            state[name] = module_from_tensors(tensors, alpha, name)
        return state

    # -- checks and transforms --------------------------------------------------------------
    def cast(self, dtype: torch.dtype) -> LoraState:
        return LoraState({n: m.cast(dtype) for n, m in self._modules.items()}, hints=self.hints)

    def check_finite(self) -> None:
        for name, m in self._modules.items():
            for suffix, t in m.file_tensors().items():
                if not all_finite(t):
                    raise FormatError(f"tensor {name}.{suffix} contains NaN or Inf values")
            if m.alpha is not None and not math.isfinite(m.alpha):
                raise FormatError(f"tensor {name}{ALPHA_SUFFIX} is not finite ({m.alpha})")

    def check_ranks(self) -> None:
        """Raise FormatError naming the first module whose rank exceeds min(out, in) of its weight."""
        for name in sorted(self._modules):
            m = self._modules[name]
            if m.variant == "lora" and m.rank > m.max_rank:
                raise FormatError(
                    f"LoRA module {name} has rank {m.rank}, above min(out, in) = {m.max_rank} of its "
                    f"{'×'.join(map(str, m.weight_shape))} weight; save the adapter at rank {m.max_rank} or less"
                )

    def check_against(self, targets: Mapping[str, Mapping[str, tuple[int, ...]]]) -> None:
        """Raise IncompatibleBaseError unless every module exists in `targets`
        ({component: {module path: weight shape}}, norm layers with their 1-D weights) with the shape the
        adapter expects. Text-encoder targets may be spelled with or without CLIP's `text_model.` wrapper.
        An adapter of another family than the base's (a Flux LoRA on an SDXL base) is refused naming both."""
        from loraforge.families import check_same_family, family_of_components

        mine, theirs = family_of_components(self.components), family_of_components(targets)
        check_same_family(mine and mine.name, theirs and theirs.name, "the adapter", "the base")
        for name in sorted(self._modules):
            component, path = name.split(".", 1)
            if component not in targets:
                raise IncompatibleBaseError(
                    f"adapter has modules for {component} but the base model has no {component}"
                )
            shapes = targets[component]
            module = self._modules[name]
            if path not in shapes and component.startswith("text_encoder"):
                path = without_text_model(path)
            if path not in shapes:
                layer = "norm layer" if module.adapts == "norm" else "module"
                raise IncompatibleBaseError(f"adapter {layer} {name} does not exist in the base model")
            want = tuple(int(s) for s in shapes[path])
            have = module.weight_shape
            if not module.fits(want):
                raise IncompatibleBaseError(f"adapter module {name} has shape {have} but the base has {want}")


def pair_names(downs: Mapping[str, Tensor], ups: Mapping[str, Tensor], alphas: Mapping[str, Tensor],
               down_label: str, up_label: str) -> None:
    """Raise FormatError naming the first factor without a partner, or an alpha without factors."""
    for name in sorted(set(downs) ^ set(ups)):
        have, missing = (down_label, up_label) if name in downs else (up_label, down_label)
        raise FormatError(f"{name}{have} has no matching {name}{missing}")
    for name in sorted(set(alphas) - set(downs)):
        raise FormatError(f"{name}{ALPHA_SUFFIX} has no LoRA weights")


def alpha_value(t: Tensor | RawTensor, name: str) -> float:
    if t.numel() != 1:
        raise FormatError(f"{name}{ALPHA_SUFFIX} must hold one number, got shape {tuple(t.shape)}")
    return float(t.item())


def _float32_scalar(value: float, like: Tensor | RawTensor) -> Tensor | RawTensor:
    """A 0-d float32 tensor of `value`, of the same kind (torch or raw) as `like`."""
    if isinstance(like, RawTensor):
        return RawTensor.float32_scalar(value)
    import torch

    return torch.tensor(value, dtype=torch.float32)
