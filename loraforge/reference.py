"""What a reference names, decided in one place: a registry artifact, a local path, a Hub repo or a builtin.

Every part of loraforge that takes a reference from a user (registry, base resolution, recipe digests,
model cards, trainers, the Hub client) asks `Reference.parse`, so `data/x` or `x.safetensors` means the
same thing everywhere, and a Hub repo id a recipe validates is one the Hub push accepts.

The rules, in order:

- `builtin:NAME` is an embedded tiny model;
- `hf://ORG/NAME[@REV]` is a Hub repo, pulled into the registry;
- `sha256:HEX` is a registry artifact by digest;
- `/x`, `./x`, `../x` and `~/x` are written as paths, whether they exist or not;
- `x/y` or `x.ext` is a path when that file or folder exists (relative to `base_dir`: the recipe's folder,
  or the current directory); otherwise `x/y[@REV]` is a Hub model id (a base downloaded into the model
  cache) and `x.ext` a registry name (names may contain dots);
- anything else (`name`, `name:3`, `name:prod`) is a registry reference.

Only the registry checks the syntax of registry references; this module checks Hub repo ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from loraforge.errors import ConfigError, HubError, UnresolvedReference

ReferenceKind = Literal["registry", "path", "builtin", "hub", "hub_model"]

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf://"
DIGEST_PREFIX = "sha256:"
PATH_PREFIXES = ("/", "./", "../", "~")
# The shape of ORG/NAME; huggingface_hub's validate_repo_id adds its own rules (length, '--', '..').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_hub_repo(repo: str) -> str:
    """`repo` if it is an ORG/NAME the Hub accepts; the one check that validation, pull and push share."""
    if not _REPO_ID.match(repo or ""):
        raise HubError(f"invalid Hub repo {repo!r}: write ORG/NAME, e.g. me/asuka-style")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        reason = str(exc).split(":")[0].rstrip(".")
        raise HubError(f"invalid Hub repo {repo!r}: {reason}; write ORG/NAME, e.g. me/asuka-style") from None
    return repo


def written_as_path(text: str) -> bool:
    """True when `text` is spelled as a path (`/x`, `./x`, `../x`, `~/x`): a path whether it exists or not."""
    return isinstance(text, str) and text.startswith(PATH_PREFIXES)


@dataclass(frozen=True)
class Reference:
    """A parsed reference: its `kind`, the text as written, and the parts that kind has."""

    kind: ReferenceKind
    text: str
    path: Optional[Path] = None  # path: the file or folder, `~` expanded and anchored at base_dir when given
    repo: Optional[str] = None  # hub, hub_model: ORG/NAME
    revision: Optional[str] = None  # hub, hub_model: tag, branch or commit after '@'
    name: Optional[str] = None  # builtin: the model's name

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str, base_dir: Optional[Path] = None) -> "Reference":
        """The one reading of `text` (see the module docstring); relative paths are looked up in `base_dir`."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"empty reference {text!r}: give a registry reference, a path, hf://ORG/NAME "
                              "or builtin:NAME")
        text = text.strip()
        if text.startswith(BUILTIN_PREFIX):
            return cls("builtin", text, name=text[len(BUILTIN_PREFIX):])
        if text.startswith(HUB_PREFIX):
            repo, revision = _repo_and_revision(text, text[len(HUB_PREFIX):])
            return cls("hub", text, repo=repo, revision=revision)
        if text.startswith(DIGEST_PREFIX):
            return cls("registry", text)
        path = _anchored(text, base_dir)
        if written_as_path(text):
            return cls("path", text, path=path)
        if ("/" in text or Path(text).suffix) and path.exists():
            return cls("path", text, path=path)
        if "/" in text:
            repo, revision = _repo_and_revision(text, text)
            return cls("hub_model", text, repo=repo, revision=revision)
        return cls("registry", text)

    @classmethod
    def parse_hub(cls, text: str) -> "Reference":
        """A Hub repo from `hf://ORG/NAME[@REV]` or `ORG/NAME[@REV]` (what `hub pull` accepts)."""
        body = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
        repo, revision = _repo_and_revision(text, body)
        return cls("hub", text, repo=repo, revision=revision)


def _anchored(text: str, base_dir: Optional[Path]) -> Path:
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~user/…` for a user that does not exist
        raise ConfigError(f"{text!r}: no user {text[1:].split('/')[0]!r} to expand '~' for; "
                          "write the path out in full") from None
    return path if base_dir is None or path.is_absolute() else Path(base_dir) / path


def _repo_and_revision(text: str, body: str) -> tuple[str, Optional[str]]:
    repo, sep, revision = body.partition("@")
    try:
        check_hub_repo(repo)
    except HubError as exc:
        if text.startswith(HUB_PREFIX):
            raise
        # Not written as a Hub reference: say what else it could have been.
        raise UnresolvedReference(f"{text!r} is not an existing file or folder, nor a Hub model id: "
                          f"{str(exc).split(': ', 1)[1]}") from None
    if sep and not revision:
        raise HubError(f"empty revision in {text!r}: write ORG/NAME@REV (a tag, branch or commit sha)")
    return repo, revision or None
