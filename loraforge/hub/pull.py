"""Pulling a Hub repo at a revision into the registry, with `hf://ORG/NAME@<sha>` as its source.

loraforge-made repos are rebuilt byte for byte from `loraforge.json` (every file's sha256 checked);
any other diffusers / kohya / PEFT LoRA repo, or a diffusers pipeline repo, is imported by format
detection. Remote file names are checked before anything is downloaded.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from loraforge.errors import HubError, IntegrityError
from loraforge.hashing import sha256_file
from loraforge.home import cache_dir, tmp_dir
from loraforge.hub.card import parse_front_matter
from loraforge.hub.client import hub_api, token as find_token, with_retries
from loraforge.hub.push import CARD, DIFFUSERS_WEIGHTS, HUB_MANIFEST, rebuild_adapter
from loraforge.reference import Reference, check_hub_repo
from loraforge.registry.manifest import BaseInfo, Manifest, Provenance
from loraforge.registry.refs import check_name
from loraforge.registry.registry import Registry
from loraforge.registry.resolve import HUB_RESOLVERS

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
WEIGHT_SUFFIXES = (".safetensors",)
# What a textual-inversion repo holds (diffusers' training script, sd-concepts-library), safetensors first.
EMBEDDING_WEIGHTS = ("learned_embeds.safetensors", "learned_embeds.bin")
TOKEN_FILE = "token_identifier.txt"
# What a diffusers pipeline repo needs; fp16/ema variants and pickles are skipped.
PIPELINE_ALLOW = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")
PIPELINE_IGNORE = ("*.fp16.*", "*ema*", "safety_checker/*", "feature_extractor/*")


def parse_hub_ref(text: str) -> tuple[str, Optional[str]]:
    """('org/name', revision or None) from `hf://org/name@rev`, `org/name@rev` or `org/name`."""
    ref = Reference.parse_hub(text)
    return ref.repo, ref.revision


def source_of(repo: str, sha: str) -> str:
    return f"hf://{repo}@{sha}"


def check_remote_name(name: str, repo: str) -> str:
    """Refuse a remote file name that could land outside the download folder."""
    pure = PurePosixPath(name)
    if (not name or name.startswith(("/", "\\")) or "\\" in name or ".." in pure.parts
            or re.match(r"^[A-Za-z]:", name) or "\0" in name or any(p in ("", ".") for p in name.split("/"))):
        raise HubError(f"refusing to pull {repo}: remote file name {name!r} would escape the download folder")
    return name


def find_pulled(registry: Registry, source: str, name: Optional[str] = None) -> Optional[Manifest]:
    """The artifact already pulled from exactly this commit (and under this name, when given)."""
    return registry.find_by_source(source, name=name)


@HUB_RESOLVERS.register("hf")
def pull_reference(registry: Registry, ref: str | Reference) -> Manifest:
    """Pull `hf://org/name@rev` (what `resolve_artifact` calls for hf:// references everywhere)."""
    ref = ref if isinstance(ref, Reference) else Reference.parse_hub(ref)
    return pull_repo(registry, ref.repo, ref.revision)


def pull_repo(registry: Registry, repo: str, revision: Optional[str] = None, name: Optional[str] = None,
              token: Optional[str] = None) -> Manifest:
    """Register `repo` at `revision` (tag, branch or sha; default main) and return its manifest.

    Pulling a commit already pulled downloads nothing and returns the existing artifact.
    """
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    check_hub_repo(repo)
    if name is not None:
        check_name(name)
    secret = find_token(token)
    api = hub_api(secret)
    rev = revision or "main"

    def resolve_sha() -> str:
        try:
            return api.model_info(repo, revision=rev).sha
        except RevisionNotFoundError:
            raise HubError(f"{repo} has no revision {rev!r}; see `loraforge hub ls {repo}`") from None
        except RepositoryNotFoundError:
            raise HubError(f"no Hub repo {repo} (or it is private: set HF_TOKEN or log in)") from None

    if SHA_RE.match(rev):
        sha = rev
    else:
        sha = with_retries(f"resolving {repo}@{rev}", resolve_sha, secret=secret)
    source = source_of(repo, sha)
    existing = find_pulled(registry, source, name)
    if existing is not None:
        return existing

    def list_files() -> dict[str, Any]:
        from huggingface_hub import RepoFile

        try:
            return {e.path: e for e in api.list_repo_tree(repo, revision=sha, recursive=True)
                    if isinstance(e, RepoFile)}
        except RevisionNotFoundError:
            raise HubError(f"{repo} has no commit {sha}; see `loraforge hub ls {repo}`") from None
        except RepositoryNotFoundError:
            raise HubError(f"no Hub repo {repo} (or it is private: set HF_TOKEN or log in)") from None

    tree = with_retries(f"listing files of {repo}@{sha[:12]}", list_files, secret=secret)
    for path in tree:
        check_remote_name(path, repo)
    cache = cache_dir(registry.home) / "hub"

    def download(path: str) -> Path:
        from huggingface_hub import hf_hub_download

        local = with_retries(
            f"downloading {path} from {repo}@{sha[:12]}",
            lambda: hf_hub_download(repo, path, revision=sha, cache_dir=cache, endpoint=api.endpoint,
                                    token=secret),
            secret=secret)
        entry = tree.get(path)
        if entry is not None and entry.lfs is not None and sha256_file(local) != entry.lfs.sha256:
            raise IntegrityError(f"{path} from {repo}@{sha[:12]} does not match the sha256 the Hub lists for it")
        return Path(local)

    if HUB_MANIFEST in tree:
        manifest = _pull_loraforge_repo(registry, repo, sha, tree, download, name)
    else:
        manifest = _pull_foreign_repo(registry, repo, sha, tree, download, name)
    shutil.rmtree(cache / f"models--{repo.replace('/', '--')}", ignore_errors=True)
    return manifest


def _pull_loraforge_repo(registry: Registry, repo: str, sha: str, tree: dict, download, name: Optional[str]) -> Manifest:
    try:
        layout = json.loads(download(HUB_MANIFEST).read_text(encoding="utf-8"))
        manifest = Manifest.model_validate(layout["manifest"])
        listed = {f["path"]: f for f in layout["files"]}
        rebuild = layout["registry_files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HubError(f"{repo}@{sha[:12]} has a {HUB_MANIFEST} loraforge cannot read ({exc})") from None
    for path in listed:
        check_remote_name(path, repo)
    for rel, how in rebuild.items():
        check_remote_name(rel, repo)
        if how.get("from") not in listed:
            raise HubError(f"{repo}@{sha[:12]}: {HUB_MANIFEST} rebuilds {rel} from a file it does not list")
    missing = sorted(p for p in listed if p not in tree)
    if missing:
        raise HubError(f"{repo}@{sha[:12]} lacks {', '.join(missing)}, which its {HUB_MANIFEST} lists")
    local: dict[str, Path] = {}
    for path in sorted({how["from"] for how in rebuild.values()}):
        local[path] = download(path)
        if sha256_file(local[path]) != listed[path]["sha256"] or local[path].stat().st_size != listed[path]["size"]:
            raise IntegrityError(
                f"{path} from {repo}@{sha[:12]} does not match the sha256 in its {HUB_MANIFEST}; "
                "the repo was changed by hand or the download is damaged"
            )
    want = {e.path: e.sha256 for e in manifest.files}
    with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="pull-") as tmp:
        files = []
        for rel, how in sorted(rebuild.items()):
            out = Path(tmp) / f"{len(files)}-{PurePosixPath(rel).name}"
            digest = rebuild_adapter(local[how["from"]], how.get("convert"), layout.get("modules"),
                                     layout.get("hints"), out)
            if digest != want.get(rel):
                raise IntegrityError(
                    f"rebuilding {rel} of {manifest.ref} from {repo}@{sha[:12]} gave sha256 {digest[:12]}, "
                    f"not the manifest's {str(want.get(rel))[:12]}; pull with the loraforge version that pushed it"
                )
            files.append((out, rel))
        provenance = manifest.provenance.model_copy(update={"source": source_of(repo, sha)})
        manifest = manifest.model_copy(update={"provenance": provenance, "name": name or manifest.name})
        return registry.register(manifest, files)


def _repo_name(repo: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]", "-", repo.split("/", 1)[1]).lstrip("._-")
    return tail[:128] or "hub-artifact"


def _pull_foreign_repo(registry: Registry, repo: str, sha: str, tree: dict, download, name: Optional[str]) -> Manifest:
    card = parse_front_matter(download(CARD).read_text(encoding="utf-8", errors="replace")) if CARD in tree else {}
    name = name or _repo_name(repo)
    if "model_index.json" in tree:
        return _pull_pipeline(registry, repo, sha, tree, download, name)
    base_model = card.get("base_model")
    base_ref = base_model if isinstance(base_model, str) else None
    params = {"repo": repo, "revision": sha}
    for key in ("license", "instance_prompt"):
        if isinstance(card.get(key), str):
            params[key] = card[key]
    embeds = next((p for p in EMBEDDING_WEIGHTS if p in tree), None)
    if embeds is not None:
        return _register_foreign_embedding(registry, download, tree, embeds, name, repo, sha, params, base_ref)
    with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="pull-") as tmp:
        if "adapter_config.json" in tree and "adapter_model.safetensors" in tree:
            folder = Path(tmp) / "peft"
            folder.mkdir()
            for path in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(download(path), folder / path)
            weights, params["file"] = folder, "adapter_model.safetensors"
        else:
            weights_name = _pick_weights(repo, sha, tree)
            weights, params["file"] = download(weights_name), weights_name
        return _register_foreign_adapter(registry, weights, name, repo, sha, params, base_ref)


def _register_foreign_embedding(registry: Registry, download, tree: dict, weights_name: str, name: str, repo: str,
                                sha: str, params: dict, base_ref: Optional[str]) -> Manifest:
    """A textual-inversion repo (diffusers' textual_inversion example, sd-concepts-library): its learned_embeds
    file (a .bin unpickled weights-only) as an `embedding`, the token from the file or its token_identifier.txt."""
    from loraforge.formats.embeddings import read_embedding
    from loraforge.registry.importer import embedding_info, register_embedding

    token = None
    if TOKEN_FILE in tree:
        token = download(TOKEN_FILE).read_text(encoding="utf-8", errors="replace").strip() or None
    emb, fmt = read_embedding(download(weights_name), token)
    params.update(file=weights_name, format=fmt, token=emb.token)
    manifest = Manifest(
        name=name, kind="embedding", digest="", files=[], embedding=embedding_info(emb, fmt),
        base=BaseInfo(ref=base_ref) if base_ref else None,
        provenance=Provenance(source=source_of(repo, sha), method="pull", params=params),
    )
    return register_embedding(registry, emb, manifest)


def _pick_weights(repo: str, sha: str, tree: dict) -> str:
    candidates = sorted(p for p in tree if p.endswith(WEIGHT_SUFFIXES))
    if DIFFUSERS_WEIGHTS in candidates:
        return DIFFUSERS_WEIGHTS
    top = [p for p in candidates if "/" not in p] or candidates
    if len(top) == 1:
        return top[0]
    if not top:
        raise HubError(f"{repo}@{sha[:12]} holds no .safetensors LoRA weights and no diffusers pipeline")
    raise HubError(
        f"{repo}@{sha[:12]} holds several weight files ({', '.join(top[:5])}); loraforge cannot tell which "
        "is the adapter: download the one you want and `loraforge registry import` it"
    )


def _register_foreign_adapter(registry: Registry, weights: Path, name: str, repo: str, sha: str,
                              params: dict, base_ref: Optional[str]) -> Manifest:
    from loraforge.formats import read_adapter
    from loraforge.registry.importer import adapter_info, register_adapter

    state, fmt, _meta = read_adapter(weights)
    params["format"] = fmt
    kind = "slider" if fmt == "slider_pt" else "lora"
    manifest = Manifest(
        name=name, kind=kind, digest="", files=[], adapter=adapter_info(state, fmt),
        base=BaseInfo(ref=base_ref) if base_ref else None,
        provenance=Provenance(source=source_of(repo, sha), method="pull", params=params),
    )
    return register_adapter(registry, state, manifest)


def _pull_pipeline(registry: Registry, repo: str, sha: str, tree: dict, download, name: str) -> Manifest:
    from loraforge.models.base import base_from_path

    wanted = sorted(p for p in tree if any(fnmatch.fnmatch(p, pat) for pat in PIPELINE_ALLOW)
                    and not any(fnmatch.fnmatch(p, pat) for pat in PIPELINE_IGNORE))
    with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="pull-") as tmp:
        folder = Path(tmp) / "pipeline"
        for path in wanted:
            dest = folder / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(download(path), dest)
        source = source_of(repo, sha)
        base = base_from_path(folder, source, home=registry.home)
        manifest = Manifest(
            name=name, kind="checkpoint", digest="", files=[], layout="diffusers",
            base=BaseInfo(ref=source, digest=base.digest, family=base.family),
            provenance=Provenance(source=source, method="pull", params={"repo": repo, "revision": sha}),
        )
        return registry.register(manifest, [(folder / p, p) for p in wanted])

