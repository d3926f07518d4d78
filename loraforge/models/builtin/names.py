"""The names and families of the builtin models: what references and bases check without building one."""

from __future__ import annotations

from loraforge.errors import UnresolvedReference
from loraforge.reference import BUILTIN_PREFIX

BUILTIN_NAMES = ("tiny-sd", "tiny-sdxl", "shapes", "tiny-flux")
BUILTIN_FAMILIES = {"tiny-sd": "sd1", "tiny-sdxl": "sdxl", "shapes": "sd1", "tiny-flux": "flux"}
# Builtins whose weights were trained and ship in the package (the others are built in code from seeds).
TRAINED_BUILTINS = ("shapes",)


def check_builtin_name(name: str) -> str:
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_FAMILIES:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        raise UnresolvedReference(f"unknown builtin model {BUILTIN_PREFIX}{name!s}; known: {known}")
    return name


def builtin_family(name: str) -> str:
    """The family name ("sd1", "sdxl", "flux") of a builtin name (with or without the `builtin:` prefix)."""
    return BUILTIN_FAMILIES[check_builtin_name(name)]
