"""Turning references into things: base models, adapters and artifacts, wherever they live.

What a reference names is decided by `loraforge.reference.Reference.parse`; this module fetches it.
`hf://` repos become registry artifacts through a resolver the Hub package registers in `HUB_RESOLVERS`
(the Hub sits above the registry, so the registry never imports it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from loraforge.errors import ConfigError
from loraforge.plugins import PluginGroup
from loraforge.reference import Reference
from loraforge.registry.manifest import Manifest
from loraforge.registry.registry import Registry

# name -> callable(registry, Reference) -> Manifest; loraforge.hub registers "hf".
HUB_RESOLVERS = PluginGroup("resolvers", "loraforge.hub", "Hub reference resolver")
_NOUNS = {"path": "local path", "builtin": "builtin model", "hub_model": "Hub model id"}


def _parsed(ref: str | Reference) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def resolve_artifact(registry: Registry, ref: str | Reference) -> Manifest:
    """A registry artifact from a registry reference, or from an `hf://` reference (pulled once)."""
    ref = _parsed(ref)
    if ref.kind == "hub":
        return HUB_RESOLVERS.get("hf")(registry, ref)
    if ref.kind != "registry":
        raise ConfigError(f"{ref.text} is a {_NOUNS[ref.kind]}, not a registry artifact: give NAME[:VERSION], "
                          "sha256:DIGEST or hf://ORG/NAME[@REV]")
    return registry.resolve(ref.text)


def resolve_base(registry: Registry, ref: str | Reference, *, digest: bool = True):
    """A `BaseModel` for builtin:NAME, a path, a Hub model id, hf://…, or a registry checkpoint.

    A registry checkpoint carries its manifest's digest (its files are never read for it); a model outside
    the registry is hashed (through the digest index) unless `digest=False`, which leaves its digest None.
    """
    from loraforge.models.base import base_from_path, locate_base

    ref = _parsed(ref)
    if ref.kind in ("builtin", "path", "hub_model"):
        return locate_base(ref, registry.home, digest=digest)
    manifest = resolve_artifact(registry, ref)
    if manifest.kind != "checkpoint":
        raise ConfigError(f"{ref.text} is a {manifest.kind}, not a checkpoint: a base must be a model")
    folder = registry.checkout(manifest)
    path = folder if manifest.layout == "diffusers" else registry.primary_file(manifest)
    base = base_from_path(path, manifest.ref, home=registry.home, digest=False)
    return dataclasses.replace(base, digest=manifest.digest)


def base_targets(base, home: Optional[Path] = None) -> dict:
    """{component: {module: weight shape}} of what adapters may change in a base: its Linear and Conv2d layers and
    its norm layers (1-D weights, for LyCORIS norm modules). A single file's are named in diffusers paths through
    its configs (`home`: where the builtin configs live), so a module it lacks is refused as with its folder."""
    from loraforge.models.base_config import single_file_targets
    from loraforge.models.targets import module_shapes

    if base.layout != "diffusers":
        return single_file_targets(base, home)
    return module_shapes(Path(base.path), with_norms=True)


def load_adapter(registry: Registry, ref: str | Reference, base=None):
    """(LoraState, Manifest or None) for a registry/hf reference or a local adapter file/folder; an embedding
    (a registry `embedding` or an embedding file) comes back as a formats.embeddings.Embedding instead, which
    the pipeline loaders take beside LoRAs and LoRA algebra refuses."""
    from loraforge.formats import read_adapter

    ref = _parsed(ref)
    if ref.kind == "path" and _is_embedding_path(ref.path):
        from loraforge.formats.embeddings import read_embedding

        return read_embedding(ref.path)[0], None
    if ref.kind == "path":
        names = None
        if base is not None:
            targets = base_targets(base)
            names = {c: dict(s) for c, s in targets.items()} if targets else None
        state, _fmt, _meta = read_adapter(ref.path, module_names=names)
        return state, None
    manifest = resolve_artifact(registry, ref)
    if manifest.kind == "embedding":
        return load_embedding(registry, manifest), manifest
    if manifest.kind not in ("lora", "slider"):
        raise ConfigError(f"{ref.text} is a {manifest.kind}, not an adapter")
    state, _fmt, _meta = read_adapter(registry.primary_file(manifest))
    return state, manifest


def _is_embedding_path(path: Path) -> bool:
    from loraforge.formats.embeddings import PICKLE_SUFFIXES, is_embedding_file, is_embedding_pickle
    from loraforge.formats.pickles import load_weights_only

    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        return is_embedding_pickle(load_weights_only(path))
    return is_embedding_file(path)


def load_embedding(registry: Registry, manifest: Manifest):
    """The formats.embeddings.Embedding a registry `embedding` artifact holds, under its recorded token."""
    from loraforge.formats.embeddings import CANONICAL_NAME, read_embedding

    folder = registry.checkout(manifest)
    emb, _fmt = read_embedding(folder / CANONICAL_NAME, manifest.embedding.token)
    emb.initializer = manifest.embedding.initializer
    return emb
