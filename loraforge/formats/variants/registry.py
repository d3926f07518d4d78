"""The adapter module variants by name: each variant module registers its class here with
`register_variant`; a malformed or taken name is refused when the module is imported."""

from __future__ import annotations

from loraforge.errors import FormatError

VARIANTS: dict[str, type] = {}


def register_variant(cls: type) -> type:
    name = getattr(cls, "variant", "")
    if not name.isidentifier() or name != name.lower():
        raise FormatError(f"adapter variant name {name!r} must be a lower-case identifier")
    if name in VARIANTS or name == "lora":
        raise FormatError(f"adapter variant {name!r} is already registered")
    VARIANTS[name] = cls
    return cls
