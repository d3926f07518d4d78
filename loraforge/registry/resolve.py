"""Turning references into things: base models, adapters and artifacts, wherever they live."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from loraforge.errors import ConfigError, UnresolvedReference
from loraforge.registry.manifest import Manifest
from loraforge.registry.refs import is_builtin_ref, is_hub_ref, looks_like_path
from loraforge.registry.registry import Registry


def pull_hub_ref(registry: Registry, ref: str) -> Manifest:
    """Pull `hf://org/name@rev` into the registry (or find the copy already pulled)."""
    try:
        from loraforge.hub.pull import pull_reference
    except ImportError:  # pragma: no cover - only before the hub part exists
        raise UnresolvedReference(f"cannot resolve {ref}: Hub support is not installed") from None
    return pull_reference(registry, ref)


def resolve_artifact(registry: Registry, ref: str) -> Manifest:
    """A registry artifact from a registry reference or an `hf://` reference."""
    if is_hub_ref(ref):
        return pull_hub_ref(registry, ref)
    return registry.resolve(ref)


def resolve_base(registry: Registry, ref: str):
    """A `BaseModel` for builtin:NAME, a path, a Hub id, hf://…, or a registry checkpoint."""
    from loraforge.models.base import base_from_path, resolve_base as resolve_external

    if is_builtin_ref(ref) or looks_like_path(ref):
        return resolve_external(ref, registry.home)
    if "/" in ref and not is_hub_ref(ref):
        return resolve_external(ref, registry.home)
    manifest = resolve_artifact(registry, ref)
    if manifest.kind != "checkpoint":
        raise ConfigError(f"{ref} is a {manifest.kind}, not a checkpoint: a base must be a model")
    folder = registry.checkout(manifest)
    path = folder if manifest.layout == "diffusers" else registry.primary_file(manifest)
    base = base_from_path(path, manifest.ref)
    return dataclasses.replace(base, digest=manifest.digest)


def base_targets(base) -> Optional[dict]:
    """{component: {module: shape}} for a diffusers-folder base; None when unknown (single files)."""
    from loraforge.models.targets import module_shapes

    if base.layout != "diffusers":
        return None
    return module_shapes(Path(base.path))


def load_adapter(registry: Registry, ref: str, base=None):
    """(LoraState, Manifest or None) for a registry/hf reference or a local adapter file/folder."""
    from loraforge.formats import read_adapter

    if looks_like_path(ref):
        names = None
        if base is not None:
            targets = base_targets(base)
            names = {c: list(s) for c, s in targets.items()} if targets else None
        state, _fmt, _meta = read_adapter(Path(ref).expanduser(), module_names=names)
        return state, None
    manifest = resolve_artifact(registry, ref)
    if manifest.kind not in ("lora", "slider"):
        raise ConfigError(f"{ref} is a {manifest.kind}, not an adapter")
    state, _fmt, _meta = read_adapter(registry.primary_file(manifest))
    return state, manifest
