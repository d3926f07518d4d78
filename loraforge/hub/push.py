"""Publishing a registry version as one Hub commit tagged `v<version>`, uploading only what changed.

A pushed adapter repo holds `pytorch_lora_weights.safetensors` (diffusers), optionally a kohya copy,
`loraforge.json` (the manifest, the sha256 of every file and how to rebuild the registry's exact
files from them) and a README.md model card.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loraforge.errors import ConfigError, HubError
from loraforge.hashing import sha256_file
from loraforge.home import tmp_dir
from loraforge.hub.card import render_card
from loraforge.hub.client import hub_api, token as find_token, with_retries
from loraforge.reference import check_hub_repo
from loraforge.registry.manifest import Manifest
from loraforge.registry.registry import Registry
from loraforge.registry.resolve import resolve_artifact

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
HUB_MANIFEST = "loraforge.json"
CARD = "README.md"
EXACT_COPY_DIR = "loraforge"  # registry bytes that no published format reproduces exactly
HUB_LAYOUT_VERSION = 1
FORMATS = ("diffusers", "kohya", "both")


@dataclass
class PushResult:
    """What a push did: the commit and tag on the Hub and what was uploaded."""

    repo: str
    ref: str
    tag: str
    commit: str
    branch: str
    uploaded_files: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    deleted_files: list[str] = field(default_factory=list)
    unchanged: bool = False
    url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StagedFile:
    local: Path
    sha256: str
    size: int


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file, what the Hub lists as `oid` for non-LFS files."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kohya_name(manifest: Manifest) -> str:
    return f"{manifest.name}_kohya.safetensors"


def _stage(path: Path) -> StagedFile:
    return StagedFile(path, sha256_file(path), path.stat().st_size)


def _hub_path(rel: str, taken: set[str]) -> str:
    return f"{EXACT_COPY_DIR}/{rel}" if rel in taken or rel.startswith(EXACT_COPY_DIR + "/") else rel


def stage_artifact(registry: Registry, manifest: Manifest, fmt: str, folder: Path,
                   license: Optional[str] = None, repo: str = "") -> dict[str, StagedFile]:
    """{path in repo: staged file} for `manifest`, generated files written under `folder`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown push format {fmt!r}: choose diffusers, kohya or both")
    checkout = registry.checkout(manifest)
    staged: dict[str, StagedFile] = {}
    rebuild: dict[str, dict[str, Optional[str]]] = {}
    layout: dict[str, Any] = {}
    weight_name = None
    reserved = {CARD, HUB_MANIFEST, DIFFUSERS_WEIGHTS, kohya_name(manifest)}
    primary_rel = None
    if manifest.kind in ("lora", "slider"):
        primary_rel = registry.primary_file(manifest).relative_to(checkout).as_posix()
        staged_weights, layout = _stage_adapter(registry, manifest, fmt, folder, primary_rel)
        staged.update({p: s for p, (s, _) in staged_weights.items()})
        for path, (_, role) in staged_weights.items():
            if role == "primary":
                rebuild[primary_rel] = {"from": path, "convert": layout["converts"][path]}
        weight_name = DIFFUSERS_WEIGHTS if fmt in ("diffusers", "both") else kohya_name(manifest)
    elif fmt != "diffusers":
        raise ConfigError(f"{manifest.ref} is a {manifest.kind}: only adapters can be pushed as {fmt}")
    for entry in manifest.files:
        if entry.path == primary_rel:
            continue
        hub_path = _hub_path(entry.path, reserved)
        staged[hub_path] = StagedFile(checkout / entry.path, entry.sha256, entry.size)
        rebuild[entry.path] = {"from": hub_path, "convert": None}
    files = sorted(staged)
    hub_manifest = {
        "loraforge_hub_layout": HUB_LAYOUT_VERSION,
        "manifest": json.loads(manifest.to_json()),
        "files": [{"path": p, "sha256": staged[p].sha256, "size": staged[p].size} for p in files],
        "registry_files": rebuild,
        "modules": layout.get("modules"),
        "hints": layout.get("hints"),
    }
    (folder / HUB_MANIFEST).write_text(json.dumps(hub_manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = render_card(manifest, weight_name=weight_name, repo=repo, files=files, license=license, registry=registry)
    (folder / CARD).write_text(card, encoding="utf-8")
    staged[HUB_MANIFEST] = _stage(folder / HUB_MANIFEST)
    staged[CARD] = _stage(folder / CARD)
    return staged


def _stage_adapter(registry: Registry, manifest: Manifest, fmt: str, folder: Path, primary_rel: str):
    """Write the published weight files; say which one rebuilds the registry file byte for byte."""
    from loraforge.formats import read_adapter, write_adapter

    primary = registry.checkout(manifest) / primary_rel
    want = next(e.sha256 for e in manifest.files if e.path == primary_rel)
    state, _fmt, _meta = read_adapter(primary)
    # Content-derived metadata only, so equal weights give equal bytes in every version.
    metadata = {"loraforge_name": manifest.name, "loraforge_digest": manifest.digest}
    out: dict[str, tuple[StagedFile, str]] = {}
    converts: dict[str, Optional[str]] = {}
    if fmt in ("diffusers", "both"):
        write_adapter(state, folder / DIFFUSERS_WEIGHTS, "diffusers", metadata)
        out[DIFFUSERS_WEIGHTS] = (_stage(folder / DIFFUSERS_WEIGHTS), "copy")
        converts[DIFFUSERS_WEIGHTS] = "diffusers"
    if fmt in ("kohya", "both"):
        name = kohya_name(manifest)
        write_adapter(state, folder / name, "kohya", metadata)
        out[name] = (_stage(folder / name), "copy")
        converts[name] = "kohya"
    modules = {c: sorted(state.component(c)) for c in state.components}
    hints = dict(state.hints)
    # Prefer rebuilding the registry file from a published file; upload the exact bytes only when
    # no published format round-trips (diffusers bakes alpha/rank into lora_B, which rounds).
    for path in sorted(out, key=lambda p: converts[p] != "kohya"):
        if rebuild_adapter(folder / path, converts[path], modules, hints, folder / "rebuilt.safetensors") == want:
            out[path] = (out[path][0], "primary")
            break
    else:
        exact = f"{EXACT_COPY_DIR}/{primary_rel}"
        out[exact] = (StagedFile(primary, want, primary.stat().st_size), "primary")
        converts[exact] = None
    (folder / "rebuilt.safetensors").unlink(missing_ok=True)
    return out, {"converts": converts, "modules": modules, "hints": hints}


def rebuild_adapter(source: Path, fmt: Optional[str], modules: Optional[dict], hints: Optional[dict],
                    out: Path) -> str:
    """Write the registry's canonical adapter file from a published one; returns its sha256."""
    from loraforge.formats import read_adapter, write_adapter

    if fmt is None:
        shutil.copyfile(source, out)
        return sha256_file(out)
    state, _fmt, _meta = read_adapter(source, module_names=modules)
    state.hints = dict(hints or {})
    write_adapter(state, out, "loraforge")
    return sha256_file(out)


# -- talking to the Hub -----------------------------------------------------------------------

def remote_tree(api, repo: str, revision: str) -> dict[str, Any]:
    from huggingface_hub import RepoFile

    return {e.path: e for e in api.list_repo_tree(repo, revision=revision, recursive=True)
            if isinstance(e, RepoFile)}


def is_same(remote, staged: StagedFile) -> bool:
    if remote is None or remote.size != staged.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == staged.sha256
    return remote.blob_id == git_blob_sha1(staged.local)


def managed_remote_files(api, repo: str, revision: str, tree: dict, cache: Path) -> set[str]:
    """Files a previous loraforge push put in the repo (only those are deleted when they go away)."""
    if HUB_MANIFEST not in tree:
        return set()
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo, HUB_MANIFEST, revision=revision, cache_dir=cache,
                           endpoint=api.endpoint, token=api.token)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {f["path"] for f in data.get("files", [])}
    except (ValueError, KeyError, TypeError):
        return set()


def plan_changes(api, repo: str, revision: str, staged: dict[str, StagedFile], cache: Path):
    """(paths to upload, paths to delete, tree) against the repo at `revision`."""
    tree = remote_tree(api, repo, revision)
    upload = [p for p in sorted(staged) if not is_same(tree.get(p), staged[p])]
    stale = managed_remote_files(api, repo, revision, tree, cache) - set(staged)
    delete = sorted(p for p in stale if p in tree)
    return upload, delete, tree


def push_artifact(registry: Registry, ref: str, repo: str, *, private: bool = False,
                  branch: Optional[str] = None, fmt: str = "diffusers", token: Optional[str] = None,
                  license: Optional[str] = None) -> PushResult:
    """Push registry artifact `ref` to Hub `repo` as one commit on `branch` tagged `v<version>`.

    Unchanged files are not uploaded (they are compared with the remote tree first); a version
    already tagged with the same content is a no-op. Transient failures are retried; a failed
    push changes nothing locally and running it again finishes the job.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RevisionNotFoundError

    from loraforge.home import cache_dir

    check_hub_repo(repo)
    manifest = resolve_artifact(registry, ref)
    if manifest.kind == "dataset":
        raise ConfigError(f"{manifest.ref} is a dataset; push adapters or checkpoints (datasets stay local)")
    secret = find_token(token)
    api = hub_api(secret)
    tag = f"v{manifest.version}"
    branch = branch or "main"
    cache = cache_dir(registry.home) / "hub"
    with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="push-") as tmp:
        staged = stage_artifact(registry, manifest, fmt, Path(tmp), license=license, repo=repo)
        with_retries(f"creating Hub repo {repo}", lambda: api.create_repo(repo, private=private, exist_ok=True),
                     secret=secret)
        refs = with_retries(f"listing refs of {repo}", lambda: api.list_repo_refs(repo), secret=secret)
        tags = {t.name: t.target_commit for t in refs.tags}
        branches = {b.name: b.target_commit for b in refs.branches}
        result = PushResult(repo=repo, ref=manifest.ref, tag=tag, commit="", branch=branch,
                            url=f"{api.endpoint}/{repo}/tree/{tag}")
        if tag in tags:
            upload, delete, _ = with_retries(
                f"comparing {manifest.ref} with {repo}@{tag}",
                lambda: plan_changes(api, repo, tags[tag], staged, cache), secret=secret)
            if upload or delete:
                raise HubError(
                    f"{repo} already has tag {tag} with other content ({', '.join(upload + delete)} differ); "
                    f"push {manifest.name} to another repo, or delete the tag on the Hub first"
                )
            result.commit, result.unchanged = tags[tag], True
            return result
        if branch not in branches:
            with_retries(f"creating branch {branch} of {repo}",
                         lambda: api.create_branch(repo, branch=branch, exist_ok=True), secret=secret)

        def commit_once() -> str:
            # Re-planned on every attempt: if a lost response hid a commit that landed, the retry
            # finds nothing to upload instead of committing twice.
            head = next(b.target_commit for b in api.list_repo_refs(repo).branches if b.name == branch)
            upload, delete, _ = plan_changes(api, repo, head, staged, cache)
            result.uploaded_files, result.deleted_files = upload, delete
            result.uploaded_bytes = sum(staged[p].size for p in upload)
            if not upload and not delete:
                return head
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(staged[p].local)) for p in upload]
            operations += [CommitOperationDelete(path_in_repo=p) for p in delete]
            info = api.create_commit(
                repo, operations, revision=branch, parent_commit=head,
                commit_message=f"{manifest.name} {tag}",
                commit_description=f"Pushed by loraforge: {manifest.ref} ({manifest.kind}), digest {manifest.digest}",
            )
            return info.oid

        try:
            result.commit = with_retries(f"committing {manifest.ref} to {repo}", commit_once, secret=secret)
        except RevisionNotFoundError:  # pragma: no cover - the branch was deleted meanwhile
            raise HubError(f"branch {branch} of {repo} disappeared during the push; run it again") from None
        with_retries(f"tagging {repo} {tag}",
                     lambda: api.create_tag(repo, tag=tag, revision=result.commit,
                                            tag_message=f"{manifest.ref} digest {manifest.digest}", exist_ok=True),
                     secret=secret)
    return result


PUBLISH_OPTIONS = ("branch", "fmt", "format", "license", "private", "token")


def check_publish_options(opts: dict) -> None:
    """Unknown options raise ConfigError so a typo in a recipe does not publish something else."""
    unknown = sorted(set(opts) - set(PUBLISH_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown publish option(s) {', '.join(map(repr, unknown))}: use "
                          f"{', '.join(PUBLISH_OPTIONS)}")


def publish(registry: Registry, artifact_ref: str, repo: str, **opts: Any) -> PushResult:
    """Push `artifact_ref` to `repo`: what a recipe's `publish:` block runs after its step succeeds.

    Options mirror `loraforge hub push`: `private` (bool), `branch` (str), `format` or `fmt`
    (diffusers / kohya / both), `license` (str), `token` (str; default HF_TOKEN or the login).
    """
    check_publish_options(opts)
    fmt = opts.get("format") or opts.get("fmt") or "diffusers"
    return push_artifact(registry, artifact_ref, repo, private=bool(opts.get("private", False)),
                         branch=opts.get("branch"), fmt=fmt, token=opts.get("token"), license=opts.get("license"))
