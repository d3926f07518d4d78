"""Artifact bundles: what a remote job returns (manifests and their files' bytes), registered at the head.

A worker never writes the head's catalog. It runs the recipe in a scratch home, packs every artifact
that home holds into a bundle, and the head registers each one unless an artifact with the same name and
input digest is already there: a retried or duplicated task never makes a second version. The head's
version numbers may differ from the scratch home's, so references between the bundle's artifacts (their
lineage) and the lock the remote apply wrote are renumbered to the head's versions.
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
    renamed: dict[str, str] = field(default_factory=dict)  # scratch home's ref -> the head's ref, per item


def manifest_input_digest(manifest: Manifest) -> Optional[str]:
    recipe = manifest.provenance.recipe
    return recipe.input_digest if recipe is not None else None


def collect_bundle(home: Path, skip: frozenset[str] = frozenset()) -> list[BundleItem]:
    """Every artifact of the scratch registry at `home` but the refs in `skip` (the head's, imported as
    inputs), with its files' bytes, oldest first."""
    registry = Registry(home)
    items = []
    for manifest in registry.iter_manifests():
        if manifest.ref in skip:
            continue
        files = {entry.path: registry.blob_path(entry).read_bytes() for entry in manifest.files}
        items.append(BundleItem(manifest.to_json(), manifest_input_digest(manifest), files))
    return items


def import_artifacts(registry: Registry, artifacts: list[dict], blob_path) -> list[str]:
    """Import the head's artifacts into a scratch registry under their own name and version (and aliases),
    so the recipe's references resolve there to the same content; returns their refs.

    `blob_path(sha256, box)` gives a local file with that blob's bytes (a node's cache). An artifact a retried
    task already imported is kept.
    """
    refs = []
    for item in artifacts:
        manifest = Manifest.from_json(item["manifest"])
        have = {row["version"]: row["digest"] for row in registry.list(name=manifest.name)}
        if have.get(manifest.version) != manifest.digest:
            files = [(blob_path(digest, box), rel) for rel, (digest, box) in item["blobs"].items()]
            registry.register(manifest, files, input_digest=item.get("input_digest"), version=manifest.version)
        for alias in item.get("aliases") or []:
            registry.tag(manifest.ref, alias)
        refs.append(manifest.ref)
    return refs


def _renamed_values(value, renamed: dict[str, str]):
    """`value` (JSON data) with every string that is exactly a renamed ref replaced by the head's ref."""
    if isinstance(value, str):
        return renamed.get(value, value)
    if isinstance(value, list):
        return [_renamed_values(v, renamed) for v in value]
    if isinstance(value, dict):
        return {k: _renamed_values(v, renamed) for k, v in value.items()}
    return value


def _renumbered(manifest: Manifest, renamed: dict[str, str]) -> Manifest:
    """`manifest` with the refs of its parents and base, and those its step's parameters name (a render's
    adapters), that name bundle artifacts in the head's numbering."""
    parents = [p.model_copy(update={"ref": renamed[p.ref]}) if p.ref in renamed else p
               for p in manifest.provenance.parents]
    update: dict = {"provenance": manifest.provenance.model_copy(update={
        "parents": parents, "params": _renamed_values(manifest.provenance.params, renamed)})}
    if manifest.base is not None and manifest.base.ref in renamed:
        update["base"] = manifest.base.model_copy(update={"ref": renamed[manifest.base.ref]})
    return manifest.model_copy(update=update)


def register_bundle(registry: Registry, bundle: list[BundleItem], recipe_path: Optional[str] = None) -> RegisterReport:
    """Register the bundle's artifacts at the head, each atomically (Registry.register) and at most once.

    An artifact is skipped when the head already holds one of its name with the same input digest (a
    retried task), or, lacking an input digest, when the newest version of its name has the same content.
    `recipe_path` replaces the scratch path the worker recorded with the recipe file the head watches.
    Items come oldest first, so a parent made in the same job is numbered at the head before its children.
    """
    report = RegisterReport()
    for item in bundle:
        manifest = Manifest.from_json(item.manifest_json)
        scratch_ref = manifest.ref
        if item.input_digest:
            found = registry.find_by_input_digest(item.input_digest, name=manifest.name)
        else:
            rows = registry.list(name=manifest.name)
            newest = max(rows, key=lambda r: r["version"]) if rows else None
            found = registry.resolve(f"{manifest.name}:{newest['version']}") \
                if newest and newest["digest"] == manifest.digest else None
        if found is not None:
            report.existing.append(found.ref)
            report.renamed[scratch_ref] = found.ref
            continue
        manifest = _renumbered(manifest, report.renamed)
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
        report.renamed[scratch_ref] = new.ref
    return report


def write_head_lock(recipe: Path, text: str, tree: str, root: Path, renamed: dict[str, str]) -> Path:
    """Write the lock a remote apply made next to the head's `recipe`, as a local apply would have: the
    paths it resolved under the task's input tree become the head's paths under `root`, and the outputs
    it records are renumbered to the head's versions."""
    from loraforge.recipes.lock import write_lock
    from loraforge.yaml_aliases import safe_load

    data = safe_load(text, "lock file") or {}
    prefix = tree.rstrip("/") + "/"
    for entry in (data.get("references") or {}).values():
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and (path == tree or path.startswith(prefix)):
            entry["path"] = str(root / path[len(prefix):]) if path != tree else str(root)
    for entry in (data.get("steps") or {}).values():
        if isinstance(entry, dict) and entry.get("output") in renamed:
            entry["output"] = renamed[entry["output"]]
    return write_lock(recipe, data)
