"""Plugin groups: merge methods, LoRA algebra methods, trainers, rewards, evaluators, recipe step kinds, formats.

Built-ins register exactly like third-party plugins: with `GROUP.register(name, ...)`. A group
imports every module of its built-in package, then every entry point of its entry-point group
(`loraforge.<group>` in a package's metadata), so `pip install loraforge-foo` adds methods.

A plugin's version is its object's `version` attribute (a class attribute of a trainer or step kind),
else the `version=` given to `register`, else 1. It is part of the input digest of every recipe step
that runs the plugin: bump it when the plugin's numbers change, so exactly the steps built with the
old code are rebuilt (an upgrade of loraforge itself rebuilds nothing).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional

from loraforge.errors import PluginError

PLUGIN_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@lru_cache(maxsize=None)
def _installed_entry_points():
    from importlib.metadata import entry_points as installed

    return installed()


def entry_points(*, group: str):
    """The installed entry points of `group`. The packages' metadata is read once per process for every
    group (each group reading it again cost ~15 ms per group, in every command that validates a recipe)."""
    return _installed_entry_points().select(group=group)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    group: str
    obj: Any
    reference_url: Optional[str] = None
    registered_version: str = "1"
    description: str = ""
    source: str = "builtin"

    @property
    def version(self) -> str:
        # Read from the object each time, so the version cannot differ from the code that runs.
        return str(getattr(self.obj, "version", self.registered_version))


@dataclass
class PluginGroup:
    """A named set of plugins with duplicate and malformed names refused at registration."""

    name: str
    builtin_package: str
    description: str = ""
    _plugins: dict[str, PluginInfo] = field(default_factory=dict)
    _loaded: bool = False
    _loading: bool = False

    @property
    def entry_point_group(self) -> str:
        return f"loraforge.{self.name}"

    def register(self, name: str, *, reference_url: str | None = None, version: str | int | None = None,
                 description: str | None = None) -> Callable[[Any], Any]:
        if not isinstance(name, str) or not PLUGIN_NAME_RE.match(name):
            raise PluginError(
                f"invalid {self.name} plugin name {name!r}: use lower-case letters, digits and '_', "
                "starting with a letter"
            )

        def decorator(obj: Any) -> Any:
            if name in self._plugins and self._plugins[name].obj is not obj:
                raise PluginError(f"{self.name} plugin {name!r} is already registered by "
                                  f"{self._plugins[name].source}")
            doc = description if description is not None else (obj.__doc__ or "").strip().split("\n")[0]
            module = getattr(obj, "__module__", "") or ""
            source = "builtin" if module.startswith("loraforge.") else module
            own = getattr(obj, "version", None)
            if version is not None and own is not None and str(own) != str(version):
                raise PluginError(f"{self.name} plugin {name!r} declares version {own} but is registered as "
                                  f"version {version}: give the version in one place")
            self._plugins[name] = PluginInfo(name, self.name, obj, reference_url, str(version or 1), doc, source)
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self._builtin_modules():
                self._import_builtin(module)
            for ep in entry_points(group=self.entry_point_group):
                self._load_entry_point(ep)
            self._loaded = True
        finally:
            self._loading = False

    def _builtin_modules(self) -> list[str]:
        # Only a package that does not exist at all is an empty group (a group without built-ins); a
        # package that exists but fails to import would otherwise leave the group silently empty.
        try:
            spec = importlib.util.find_spec(self.builtin_package)
        except ModuleNotFoundError:  # a parent package is missing
            spec = None
        if spec is None:
            return []
        package = self._import_builtin(self.builtin_package)
        if not hasattr(package, "__path__"):
            return []
        return [f"{self.builtin_package}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                if not info.name.startswith("_")]

    def _import_builtin(self, module: str) -> Any:
        try:
            return importlib.import_module(module)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"cannot import the built-in {self.name} plugins of {module}: "
                              f"{type(exc).__name__}: {exc}; reinstall loraforge or install what it names") from None

    def _load_entry_point(self, ep) -> None:
        if ep.name in self._plugins:
            # Without this an installed plugin would be ignored without a word, and the user would
            # run the built-in while believing they run the plugin.
            taken = self._plugins[ep.name]
            owner = "a built-in" if taken.source == "builtin" else f"one from {taken.source}"
            raise PluginError(f"{self.name} plugin {ep.name!r} from entry point {ep.value} has the name of "
                              f"{owner} {self.description or self.name}: rename the entry point in its "
                              "package's metadata, or uninstall that package")
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(f"cannot load {self.name} plugin {ep.name!r} from {ep.value}: {exc}") from None
        self.register(ep.name, reference_url=getattr(obj, "reference_url", None))(obj)

    def get(self, name: str) -> Any:
        return self.info(name).obj

    def info(self, name: str) -> PluginInfo:
        self._load()
        if name not in self._plugins:
            known = ", ".join(sorted(self._plugins)) or "none installed"
            raise PluginError(f"unknown {self.description or self.name} {name!r}: choose one of {known}")
        return self._plugins[name]

    def construct(self, info: PluginInfo, options: dict[str, Any], *, label: str, error: type[Exception],
                  wrap_function: Callable[[Any, str], Any], registry: Any = None, hidden: tuple[str, ...] = ()) -> Any:
        """An instance of plugin `info` configured with `options`, its `version` set: a plain-function plugin
        (an entry point may be one) is `wrap_function(fn, version)` and takes no options; a class has `options`
        checked against its `__init__` (an unknown one refused in one line listing what it accepts, `hidden`
        left out of that list) and gets `registry` when `__init__` asks for it. `label` names the plugin in
        messages ("metric 'shapes'"), `error` is the exception raised."""
        obj = info.obj
        if not inspect.isclass(obj):
            if options:
                raise error(f"{label} is a plain function and takes no options; got {sorted(options)}")
            return wrap_function(obj, info.version)
        params = inspect.signature(obj.__init__).parameters
        accepted = {p for p in params if p not in ("self", "registry")}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise error(f"unknown option(s) {', '.join(unknown)} for {label}; "
                        f"it accepts: {', '.join(sorted(accepted - set(hidden))) or 'none'}")
        instance = obj(**options, **({"registry": registry} if "registry" in params else {}))
        instance.version = str(getattr(instance, "version", None) or info.version)
        return instance

    def names(self) -> list[str]:
        self._load()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[PluginInfo]:
        self._load()
        return iter(sorted(self._plugins.values(), key=lambda p: p.name))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._plugins


MERGE_METHODS = PluginGroup("merge_methods", "loraforge.ops.merge_methods", "checkpoint merge method")
LORA_METHODS = PluginGroup("lora_methods", "loraforge.ops.lora_methods", "LoRA merge method")
TRAINERS = PluginGroup("trainers", "loraforge.train.trainers", "trainer")
REWARDS = PluginGroup("rewards", "loraforge.rewards", "reward")
EVALUATORS = PluginGroup("evaluators", "loraforge.evaluators", "evaluator")
STEP_KINDS = PluginGroup("step_kinds", "loraforge.recipes.steps", "recipe step kind")
FORMATS = PluginGroup("formats", "loraforge.formats", "adapter format")

GROUPS: dict[str, PluginGroup] = {g.name: g for g in (MERGE_METHODS, LORA_METHODS, TRAINERS, REWARDS, EVALUATORS,
                                                      STEP_KINDS, FORMATS)}
