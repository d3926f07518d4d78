"""Artifact bundles: what a remote job returns (manifests and their files' bytes), registered at the head.

A worker never writes the head's catalog. It runs the recipe in a scratch home, packs every artifact
that home holds into a bundle, and the head registers each one unless an artifact with the same name and
input digest is already there: a retried or duplicated task never makes a second version.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraforge.registry import Manifest, Registry


@dataclass
class BundleItem:
    manifest_json: str
    input_digest: Optional[str]
    files: dict[str, bytes] = field(default_factory=dict)  # path inside the artifact -> bytes


@dataclass
class RegisterReport:
    registered: list[str] = field(default_factory=list)  # refs of new versions
    existing: list[str] = field(default_factory=list)  # refs that already held the same input digest


def _input_digest(manifest: Manifest) -> Optional[str]:
    recipe = manifest.provenance.recipe
    return recipe.input_digest if recipe is not None else None


def collect_bundle(home: Path) -> list[BundleItem]:
    """Every artifact of the scratch registry at `home`, with its files' bytes, oldest first."""
    registry = Registry(home)
    items = []
    for manifest in registry.iter_manifests():
        files = {entry.path: registry.blob_path(entry).read_bytes() for entry in manifest.files}
        items.append(BundleItem(manifest.to_json(), _input_digest(manifest), files))
    return items


def register_bundle(registry: Registry, bundle: list[BundleItem], recipe_path: Optional[str] = None) -> RegisterReport:
    """Register the bundle's artifacts at the head, each atomically (Registry.register) and at most once.

    An artifact is skipped when the head already holds one of its name with the same input digest (a
    retried task), or, lacking an input digest, when the newest version of its name has the same content.
    `recipe_path` replaces the scratch path the worker recorded with the recipe file the head watches.
    """
    report = RegisterReport()
    for item in bundle:
        manifest = Manifest.from_json(item.manifest_json)
        if item.input_digest:
            found = registry.find_by_input_digest(item.input_digest, name=manifest.name)
        else:
            rows = registry.list(name=manifest.name)
            newest = max(rows, key=lambda r: r["version"]) if rows else None
            found = registry.resolve(f"{manifest.name}:{newest['version']}") \
                if newest and newest["digest"] == manifest.digest else None
        if found is not None:
            report.existing.append(found.ref)
            continue
        if recipe_path and manifest.provenance.recipe is not None:
            recipe = manifest.provenance.recipe.model_copy(update={"path": recipe_path})
            manifest = manifest.model_copy(update={"provenance": manifest.provenance.model_copy(
                update={"recipe": recipe})})
        staging = Path(tempfile.mkdtemp(prefix="bundle-", dir=registry.home / "tmp"
                                        if (registry.home / "tmp").is_dir() else None))
        try:
            files = []
            for rel, data in item.files.items():
                path = staging / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                files.append((path, rel))
            new = registry.register(manifest, files, input_digest=item.input_digest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report.registered.append(new.ref)
    return report
