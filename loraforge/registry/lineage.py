"""The lineage of a registry artifact: the tree of its parents down to bases, datasets and sources.

Built from the stored manifest dicts (`loraforge.registry.rows`), so `registry lineage` needs no pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from loraforge.errors import LoraforgeError
from loraforge.registry.catalog import Catalog
from loraforge.registry.rows import resolve


@dataclass
class LineageNode:
    ref: str
    kind: str
    role: str = "self"
    weight: Optional[float] = None
    digest: Optional[str] = None
    children: list["LineageNode"] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ref": self.ref, "kind": self.kind, "role": self.role, "weight": self.weight,
            "digest": self.digest, "parents": [c.to_dict() for c in self.children],
        }


def lineage(catalog: Catalog, ref: str, max_depth: int = 32) -> LineageNode:
    """The tree under REF; a parent that is not in the registry (or not the version recorded) is a leaf:
    `dataset` for a dataset role, `external` otherwise."""
    return _node(catalog, resolve(catalog, ref).manifest(), "self", None, max_depth, set())


def _parents(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    parents = list((manifest.get("provenance") or {}).get("parents") or [])
    base = manifest.get("base")
    if base and not any(p.get("role") == "base" for p in parents):
        parents.append({"ref": base["ref"], "digest": base.get("digest"), "role": "base", "weight": None})
    return parents


def _node(catalog: Catalog, manifest: dict[str, Any], role: str, weight, depth: int, seen: set) -> LineageNode:
    ref = f"{manifest['name']}:{manifest['version']}"
    node = LineageNode(ref=ref, kind=manifest["kind"], role=role, weight=weight, digest=manifest["digest"])
    seen = seen | {ref}
    for parent in _parents(manifest):
        parent_ref, parent_digest = parent["ref"], parent.get("digest")
        parent_role, parent_weight = parent.get("role", "input"), parent.get("weight")
        child = None
        if depth > 0 and parent_ref not in seen:
            try:
                found = resolve(catalog, parent_ref)
            except LoraforgeError:  # a base path, builtin:…, hf://… or a removed version: not in the registry
                found = None
            if found is not None and (parent_digest is None or found.digest == parent_digest):
                child = _node(catalog, found.manifest(), parent_role, parent_weight, depth - 1, seen)
        if child is None:
            kind = "dataset" if parent_role == "dataset" else "external"
            child = LineageNode(ref=parent_ref, kind=kind, role=parent_role, weight=parent_weight, digest=parent_digest)
        node.children.append(child)
    return node
