"""Package re-exports that import their module on first use, so importing a package stays cheap."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, module_of: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: `name` comes from `package.<module_of[name]>`, imported
    the first time it is asked for and then kept on the package."""

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
