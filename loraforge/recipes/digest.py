"""Input digests: what every reference of a step resolves to, and the digest of a step's inputs.

A step's input digest = sha256 of {its kind, its normalised config with every reference replaced
by the identity of what it points at, the versions of its step kind and of the plugins it runs}.
Not loraforge's own version: an upgrade rebuilds only steps whose kind or method declares new
numbers by bumping its `version`. The identity of `${step}` is that
step's own input digest (outputs are reused by input digest, so this is known before anything
runs and a whole plan is computed up front); of a registry artifact its content digest; of a
local file or folder (a dataset) the digest of its bytes (see hashing.DigestIndex: unchanged files
are not read again); of `builtin:NAME` the model's digest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loraforge.errors import LoraforgeError, RecipeError
from loraforge.hashing import DigestIndex, sha256_json
from loraforge.home import digest_index_file, home_is_writable
from loraforge.plugins import GROUPS, STEP_KINDS
from loraforge.recipes.loader import step_ref
from loraforge.recipes.schema import Recipe, Step


@dataclass(frozen=True)
class Resolved:
    """What one external reference resolved to."""

    ref: str
    kind: str  # artifact | builtin | path | hub | external
    digest: str
    pinned: Optional[str] = None  # name:version for registry artifacts
    path: Optional[str] = None  # absolute path for local files and folders
    artifact_kind: Optional[str] = None

    def to_lock(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "ref"}


@dataclass
class StepInputs:
    input_digest: str
    config_digest: str
    inputs: dict[str, str]  # reference as written → identity
    concrete: dict[tuple, str] = field(default_factory=dict)  # location → reference the runner uses
    versions: dict[str, str] = field(default_factory=dict)  # "group/name" → plugin version (see step_versions)


class Resolver:
    """Resolves external references once per plan; with a lock, registry references use its pins."""

    def __init__(self, registry, recipe: Recipe, lock: Optional[dict] = None):
        self.registry = registry
        self.recipe = recipe
        self.lock = lock
        self.base_dir = recipe.source.path.parent
        self.cache: dict[str, Resolved] = {}
        home = registry.home
        self.digests = DigestIndex(digest_index_file(home) if home_is_writable(home) else None)

    def resolve(self, value: str, where: tuple) -> Resolved:
        if value in self.cache:
            return self.cache[value]
        try:
            resolved = self._resolve(value)
        except LoraforgeError as exc:
            raise self.recipe.source.error(where, str(exc)) from None
        self.cache[value] = resolved
        return resolved

    def _locked(self, value: str) -> Optional[dict]:
        if self.lock is None:
            return None
        entry = (self.lock.get("references") or {}).get(value)
        if entry is None:
            raise RecipeError(f"reference {value!r} is not in the lock file: run apply without --locked to update it")
        return entry

    def _resolve(self, value: str) -> Resolved:
        from loraforge.reference import Reference
        from loraforge.registry.resolve import resolve_artifact, resolve_base

        locked = self._locked(value)
        ref = Reference.parse(value, base_dir=self.base_dir)  # relative paths are the recipe folder's
        if ref.kind == "path":
            path = ref.path.resolve()
            if not path.exists():
                raise RecipeError(f"{value} does not exist (looked for {path})")
            digest = self.digests.digest(path)
            resolved = Resolved(value, "path", digest, path=str(path))
        elif ref.kind == "builtin":
            resolved = Resolved(value, "builtin", resolve_base(self.registry, ref).digest)
        elif ref.kind == "hub" and ref.revision is not None:
            resolved = Resolved(value, "hub", sha256_json(value))  # a pinned revision names its content
        elif ref.kind == "hub_model":
            resolved = Resolved(value, "external", sha256_json(value))  # a Hub model id, resolved when run
        else:
            manifest = resolve_artifact(self.registry, locked["pinned"] if locked and locked.get("pinned") else ref)
            resolved = Resolved(value, "artifact", manifest.digest, pinned=manifest.ref, artifact_kind=manifest.kind)
        if locked is not None and locked.get("digest") != resolved.digest:
            noun = "dataset" if resolved.kind == "path" and Path(resolved.path or "").is_dir() else resolved.kind
            raise RecipeError(f"{noun} {value} changed since the lock was written: "
                              "run apply without --locked to rebuild and update the lock")
        return resolved


def _set(config: Any, loc: tuple, value: Any) -> None:
    target = config
    for part in loc[:-1]:
        target = target[part]
    target[loc[-1]] = value


def spec_config(step: Step) -> dict:
    """The step's spec as plain JSON data, with defaults filled in (the normalised config)."""
    return step.spec.model_dump(mode="json", by_alias=True)


def compute_inputs(step: Step, resolver: Resolver, step_digests: dict[str, str],
                   step_outputs: dict[str, str] | None = None) -> StepInputs:
    """The StepInputs of `step`; `step_digests` holds the input digests of the steps it reads."""
    as_written = spec_config(step)
    normalised = spec_config(step)
    inputs: dict[str, str] = {}
    concrete: dict[tuple, str] = {}
    for loc, role, value in step.references():
        if value is None:
            continue
        target = step_ref(value)
        if target is not None:
            identity = "step:" + step_digests[target]
            if step_outputs and target in step_outputs:
                concrete[loc] = step_outputs[target]
        else:
            where = ("steps", step.id, *loc)
            resolved = resolver.resolve(value, where)
            if role == "adapter" and resolved.artifact_kind not in (None, "lora", "slider", "embedding"):
                raise resolver.recipe.source.error(where, f"{value} is a {resolved.artifact_kind}, not an adapter")
            if role == "lora" and resolved.artifact_kind == "embedding":
                raise resolver.recipe.source.error(where, f"{value} is an embedding, which LoRA algebra cannot fold into "
                                                          "a LoRA: combine LoRAs and sliders here, and give the "
                                                          "embedding to a render step")
            if role == "lora" and resolved.artifact_kind not in (None, "lora", "slider"):
                raise resolver.recipe.source.error(where, f"{value} is a {resolved.artifact_kind}, not a LoRA or slider")
            if role == "model" and resolved.artifact_kind not in (None, "checkpoint"):
                raise resolver.recipe.source.error(where, f"{value} is a {resolved.artifact_kind}, not a checkpoint")
            identity = f"{resolved.kind}:{resolved.digest}"
            concrete[loc] = resolved.pinned or resolved.path or value
        inputs[value] = identity
        _set(normalised, loc[1:], identity)
    versions = step_versions(step)
    payload = {"kind": step.kind, "config": normalised, "versions": versions}
    return StepInputs(input_digest=sha256_json(payload), config_digest=sha256_json(as_written),
                      inputs=inputs, concrete=concrete, versions=versions)


def step_versions(step: Step) -> dict[str, str]:
    """The version of the step's kind and of every plugin it runs, as {"group/name": version}."""
    versions = {f"{STEP_KINDS.name}/{step.kind}": STEP_KINDS.info(step.kind).version}
    for group, name in step.definition.plugins(step.spec):
        versions[f"{group.name}/{name}"] = group.info(name).version
    return versions


def version_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """In words, each plugin whose version differs between two step_versions results."""
    changes = []
    for key, version in new.items():
        before = old.get(key)
        if before is not None and before != version:
            group, name = key.split("/", 1)
            noun = GROUPS[group].description if group in GROUPS else group
            changes.append(f"{noun} {name} version changed ({before} -> {version})")
    return changes


def concrete_spec(step: Step, concrete: dict[tuple, str]):
    """The step's spec with references replaced by what the runner should load (refs, versions, paths)."""
    config = step.spec.model_dump(mode="python", by_alias=True)
    for loc, value in concrete.items():
        _set(config, loc[1:], value)
    return type(step.spec).model_validate(config)
