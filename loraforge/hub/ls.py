"""Versions of a Hub repo (its `v<N>` tags) side by side with the registry's versions and pulls."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from loraforge.home import cache_dir
from loraforge.hub.client import hub_api, token as find_token, with_retries
from loraforge.hub.push import HUB_MANIFEST
from loraforge.reference import check_hub_repo
from loraforge.registry.registry import Registry

VERSION_TAG = re.compile(r"^v(\d+)$")


def hub_versions(registry: Registry, repo: str, token: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per version: its Hub tag and commit, the local version of the same name, local pulls.

    The artifact name comes from the repo's `loraforge.json` on main; a repo not made by loraforge
    lists its tags and the local pulls of them.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    check_hub_repo(repo)
    secret = find_token(token)
    api = hub_api(secret)

    def refs():
        try:
            return api.list_repo_refs(repo)
        except RepositoryNotFoundError:
            from loraforge.errors import HubError

            raise HubError(f"no Hub repo {repo} (or it is private: set HF_TOKEN or log in)") from None

    git_refs = with_retries(f"listing tags of {repo}", refs, secret=secret)
    name = None

    def read_name() -> Optional[str]:
        files = set(api.list_repo_files(repo))
        if HUB_MANIFEST not in files:
            return None
        path = hf_hub_download(repo, HUB_MANIFEST, cache_dir=cache_dir(registry.home) / "hub",
                               endpoint=api.endpoint, token=secret)
        return json.loads(Path(path).read_text(encoding="utf-8"))["manifest"]["name"]

    name = with_retries(f"reading {HUB_MANIFEST} of {repo}", read_name, secret=secret)
    rows: dict[int, dict[str, Any]] = {}

    def row(version: int) -> dict[str, Any]:
        return rows.setdefault(version, {"version": version, "hub_tag": None, "hub_commit": None,
                                         "local": None, "local_digest": None, "pulled_as": []})

    by_commit: dict[str, int] = {}
    for tag in git_refs.tags:
        match = VERSION_TAG.match(tag.name)
        if match:
            r = row(int(match[1]))
            r["hub_tag"], r["hub_commit"] = tag.name, tag.target_commit
            by_commit[tag.target_commit] = int(match[1])
    if name:
        for item in registry.list(name=name):
            r = row(item["version"])
            r["local"], r["local_digest"] = f"{item['name']}:{item['version']}", item["digest"]
    prefix = f"hf://{repo}@"
    for manifest in registry.iter_manifests():
        source = manifest.provenance.source or ""
        if source.startswith(prefix):
            commit = source[len(prefix):]
            if commit in by_commit:
                row(by_commit[commit])["pulled_as"].append(manifest.ref)
    return [rows[v] for v in sorted(rows)]
