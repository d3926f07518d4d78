"""What a recipe step kind is: one class owns its spec, output kind, references, defaults, checks and run.

Built-in kinds are one module each in loraforge.recipes.steps, registered with
`@STEP_KINDS.register("name")`; a package adds a kind through the `loraforge.step_kinds` entry-point
group, and recipes then use it as `steps: {ID: {NAME: {...spec...}}}` exactly like a built-in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional

from pydantic import BaseModel

from loraforge.errors import LoraforgeError
from loraforge.ops.specs import Spec  # frozen (it is hashed into input digests) and strict about keys
from loraforge.plugins import PluginGroup
from loraforge.recipes.loader import is_local_path, step_ref
from loraforge.recipes.schema import Recipe, Step, StepDefaults
from loraforge.registry import Registry
from loraforge.registry.manifest import Manifest, Parent, RecipeInfo

# Which artifact kinds a reference role accepts ("adapter" output of a train step fits all three: a LoRA,
# a slider or a textual-inversion embedding); a role with an empty set (a path) is never a `${step}` and is
# not checked against what a step makes.
ROLE_ACCEPTS: dict[str, set[str]] = {
    "model": {"checkpoint"},
    "adapter": {"lora", "slider", "embedding", "adapter"},
    # LoRA algebra's inputs (stack, lora_merge): an embedding has no ΔW to combine, so it is not one.
    "lora": {"lora", "slider", "adapter"},
    "artifact": {"checkpoint", "lora", "slider", "embedding", "adapter", "image", "dataset", "report"},
    "any": {"checkpoint", "lora", "slider", "embedding", "adapter", "image", "dataset", "report"},
    "path": set(),
}


class SpecReference(NamedTuple):
    """A reference inside a spec: where it sits (keys below the spec), its role and the value written."""

    loc: tuple
    role: str  # model | adapter | lora | artifact | path | any (see ROLE_ACCEPTS)
    value: Optional[str]


@dataclass
class StepContext:
    """Everything a step's `run` needs: the registry, the step's concrete spec and its provenance facts."""

    registry: Registry
    recipe: Recipe
    step: Step
    spec: BaseModel  # the step's spec with references replaced by exact registry refs and paths
    output: Optional[str]
    recipe_info: RecipeInfo
    input_digest: str
    echo: Callable[[str], None] = print

    def stamp(self, manifest: Manifest, parents: list[Parent] | None = None, method: str | None = None,
              params: dict | None = None) -> Manifest:
        """`manifest` with this step's recipe facts (and given parents/method/params) in provenance."""
        update: dict = {"recipe": self.recipe_info, "source": f"recipe:{self.recipe.name}#{self.step.id}"}
        if parents is not None:
            update["parents"] = parents
        if method is not None:
            update["method"] = method
        if params is not None:
            update["params"] = params
        return manifest.model_copy(update={"provenance": manifest.provenance.model_copy(update=update)})


class StepKind:
    """One recipe step kind. Subclasses set `spec_class` and override what differs from these defaults.

    `version` is part of the input digest of every step of this kind: bump it when `run` would
    produce different numbers from the same spec, so outputs of the old code are rebuilt.
    """

    spec_class: ClassVar[type[BaseModel]]
    version: ClassVar[int] = 1
    # False for a kind that registers nothing (publish): whether it ran is recorded in the lock.
    makes_artifact: ClassVar[bool] = True

    def output_kind(self, spec: Any) -> Optional[str]:
        """The artifact kind a step registers (None: unknown until it runs, or nothing)."""
        return None

    def references(self, spec: Any) -> list[SpecReference]:
        """Every reference in `spec`: what the digest resolves and the graph follows."""
        return []

    def with_defaults(self, spec: Any, defaults: StepDefaults) -> Any:
        """`spec` with what the recipe supplies (its base, a title) filled into keys left out."""
        return spec

    def plugins(self, spec: Any) -> list[tuple[PluginGroup, str]]:
        """The (group, name) plugins a step runs: names are checked, versions go into the input digest."""
        return []

    def check(self, recipe: Recipe, step: Step) -> None:
        """Checks beyond the spec model that need the recipe or installed plugins (after `plugins`)."""

    def spec_keys(self, spec: Any) -> Optional[set[str]]:
        """The top-level keys a spec of this kind takes (None: any key): what a `sweep:` may vary."""
        cls = type(spec)
        if cls.model_config.get("extra") == "allow":
            return None
        return set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}

    def scores(self, spec: Any) -> list[tuple[str, list[str]]]:
        """(reference as written, metric names) of each artifact a step scores; gated publishes wait for it.

        By default a spec with `refs` and `metrics` lists (the `eval` step's) scores every ref with every metric.
        """
        refs, metrics = getattr(spec, "refs", None), getattr(spec, "metrics", None)
        if not isinstance(refs, (list, tuple)) or not isinstance(metrics, (list, tuple)):
            return []
        names = [m if isinstance(m, str) else str(getattr(m, "name", m)) for m in metrics]
        return [(ref, names) for ref in refs if isinstance(ref, str)]

    def runs_after(self, recipe: Recipe, step: Step) -> list[str]:
        """Steps this one waits for beyond those it reads (a gated publish waits for the evals scoring it)."""
        return []

    def run(self, ctx: StepContext) -> Optional[Manifest]:
        """Build the step; return the manifest it registered (None for a kind that makes no artifact)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")


def fill_base(spec: Any, defaults: StepDefaults) -> Any:
    """`spec` with the recipe's base where its `base` is left out."""
    return spec.model_copy(update={"base": defaults.base}) if spec.base is None else spec


def adapter_references(adapters, role: str = "adapter") -> list[SpecReference]:
    """The `adapters[i].ref` references of a spec; `role` "lora" where LoRA algebra combines them."""
    return [SpecReference(("adapters", i, "ref"), role, a.ref) for i, a in enumerate(adapters)]


def check_method_params(recipe: Recipe, step: Step, group: PluginGroup) -> None:
    """A merge step's `params:` checked by its method's Params model, with the parameter's position."""
    from loraforge.ops.method_params import method_params

    try:
        method_params(group.description, step.spec.method, group.get(step.spec.method), step.spec.params)
    except LoraforgeError as exc:
        loc = ("steps", step.id, step.kind, "params") + ((exc.param,) if getattr(exc, "param", None) else ())
        raise recipe.source.error(loc, str(exc)) from None


def nested_references(loc: tuple, key: str, value: Any) -> list[SpecReference]:
    """References in free-form config (a trainer's): `${step}`s and paths, at any depth."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in nested_references(loc + (k,), k, v)]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in nested_references(loc + (i,), key, v)]
    if not isinstance(value, str):
        return []
    if step_ref(value) or is_local_path(value):
        return [SpecReference(loc, "path" if is_local_path(value) else "any", value)]
    return []


__all__ = ["ROLE_ACCEPTS", "Spec", "SpecReference", "StepContext", "StepDefaults", "StepKind"]
