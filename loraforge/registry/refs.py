"""Registry references: `name`, `name:3`, `name:prod`, `sha256:ab12…`, and weighted `REF=W`.

Which kind of reference a text is (registry, path, Hub, builtin) is `loraforge.reference.Reference.parse`'s call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from loraforge.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(
            f"invalid artifact name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias or "") or alias == "latest":
        raise ConfigError(
            f"invalid alias {alias!r}: an alias starts with a letter, uses letters, digits, '.', '_', '-', "
            "and 'latest' is reserved"
        )
    return alias


@dataclass(frozen=True)
class RegistryRef:
    """A reference to a registry artifact."""

    name: Optional[str] = None
    version: Optional[int] = None
    alias: Optional[str] = None
    digest_prefix: Optional[str] = None

    def __str__(self) -> str:
        if self.digest_prefix:
            return f"sha256:{self.digest_prefix}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias:
            return f"{self.name}:{self.alias}"
        return str(self.name)


def parse_registry_ref(ref: str) -> RegistryRef:
    ref = ref.strip()
    if ref.startswith("sha256:"):
        prefix = ref[len("sha256:"):].lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise ConfigError(f"invalid digest reference {ref!r}: give at least 4 hex digits after 'sha256:'")
        return RegistryRef(digest_prefix=prefix)
    name, sep, tail = ref.partition(":")
    check_name(name)
    if not sep:
        return RegistryRef(name=name)
    if tail.isdigit():
        return RegistryRef(name=name, version=int(tail))
    if tail == "latest":
        return RegistryRef(name=name)
    check_alias(tail)
    return RegistryRef(name=name, alias=tail)


def parse_weighted(text: str, default: float = 1.0) -> tuple[str, float]:
    """Split `REF=W` into (REF, W). `REF` alone has weight `default`."""
    ref, sep, weight = text.rpartition("=")
    if not sep:
        return text, default
    try:
        return ref, float(weight)
    except ValueError:
        raise ConfigError(f"invalid weight in {text!r}: write REF=NUMBER, e.g. asuka:3=0.8") from None

