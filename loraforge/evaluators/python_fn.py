"""User metrics given as `python:module:function`: a function (images, prompts) -> list[float], such as OCR or a
detector. `import_function` is also how a `python:` reward finds its function (rewards.python_fn)."""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

from loraforge.errors import ConfigError
from loraforge.evaluators.base import call_user_function, check_scores
from loraforge.hashing import sha256_bytes
from loraforge.plugins import EVALUATORS, PluginGroup, PluginInfo


def import_function(function: str, noun: str = "metric",
                    error: type[Exception] = ConfigError) -> tuple[Callable, str]:
    """(the function `module:function` names, its version): its `version` attribute if it has one, else a digest
    of its source, so an edited function is recorded as another version. Failures raise `error` naming the
    python `noun` (metric, reward)."""
    module_name, _, attr = function.partition(":")
    if not module_name or not attr:
        raise error(f"bad python {noun} {function!r}: use python:module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import module {module_name!r} of python {noun} {function!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"module {module_name!r} has no function {attr!r} (python {noun} {function!r})")
    version = getattr(fn, "version", None)
    if version is None:
        try:
            version = "src-" + sha256_bytes(inspect.getsource(fn).encode())[:12]
        except (OSError, TypeError):
            version = "1"
    return fn, str(version)


class UserFunctions(PluginGroup):
    """The `python:module:function` metrics a recipe names, as a plugin group: each is imported when first asked
    for, and its version is the function's own (see `import_function`), so a recipe step's input digest changes
    when the function is edited, as it does when a built-in evaluator's version is bumped."""

    def info(self, name: str) -> PluginInfo:
        # Looked up on every call (the module is imported once per process): the version is the function's now.
        fn, version = import_function(name.removeprefix("python:"))
        self._plugins[name] = PluginInfo(name, self.name, fn, registered_version=version,
                                         description="a user function", source=getattr(fn, "__module__", ""))
        return self._plugins[name]


# Nothing is built in or installed here: the group holds the functions recipes have named in this process.
USER_FUNCTIONS = UserFunctions("python_metrics", "loraforge.evaluators.user_functions", "python metric")


@EVALUATORS.register("python", version="1", description="A user function f(images, prompts) -> list[float], "
                                                        "given as python:module:function.")
class PythonFunctionEvaluator:
    """Calls `module.function(images, prompts)`; its version is the function's `version` attribute, else a
    digest of its source."""

    def __init__(self, function: str):
        self.fn, self.version = import_function(function)
        self.name = f"python:{function}"

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, call_user_function(self.name, self.fn, images, prompts), len(images))
