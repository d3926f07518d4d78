"""Reading a recipe file: YAML with line/column positions, `vars:` with `--set` overrides, `${...}` checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from loraforge.errors import RecipeError
from loraforge.yaml_aliases import YAML_LOADERS, AliasExpansionError, check_expansion, mark

Path_ = tuple  # a path into the YAML document: ("steps", "mix", "merge", "models", 0, "ref")

REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
# `${x}` is not a plain scalar inside YAML flow collections ({ } are flow indicators), so before
# parsing every `${x}` becomes `$(x)` — same length, so line/column positions stay exact.
_SAFE_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
VAR_PREFIX = "vars."


@dataclass
class RecipeSource:
    """A parsed recipe document: plain data, where each value sits in the file, and the file."""

    path: Path
    data: dict
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def where(self, loc: Iterable[Any]) -> str:
        """`FILE:LINE:COL` of the deepest existing prefix of `loc`."""
        loc = tuple(loc)
        while loc and loc not in self.positions:
            loc = loc[:-1]
        line, col = self.positions.get(loc, (1, 1))
        return f"{self.path}:{line}:{col}"

    def error(self, loc: Iterable[Any], message: str) -> RecipeError:
        loc = tuple(loc)
        dotted = ".".join(str(p) for p in loc)
        return RecipeError(f"{self.where(loc)}: {dotted + ': ' if dotted else ''}{message}")


def _restore(text: str) -> str:
    return _SAFE_RE.sub(lambda m: "${" + m.group(1) + "}", text)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """Plain data and positions from a composed YAML node graph (PyYAML's constructor keeps neither)."""

    def __init__(self, loader: yaml.SafeLoader, source: Path):
        self.loader = loader
        self.source = source
        self.positions: dict = {}
        # Keys written in a mapping itself, before merge keys (`<<: *base`) add others: an
        # explicit key may override a merged one, but not another explicit one. Kept per node because
        # flatten_mapping rewrites a node in place and an aliased node is built again.
        self._explicit: dict[int, set[int]] = {}

    def build(self, node: yaml.Node, path: tuple = ()) -> Any:
        self.positions.setdefault(path, mark(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node, deep=True)
        return _restore(value) if isinstance(value, str) else value

    def _mapping(self, node: yaml.MappingNode, path: tuple) -> dict:
        explicit = self._explicit.setdefault(id(node), {id(k) for k, _ in node.value if k.tag != _MERGE_TAG})
        self.loader.flatten_mapping(node)
        out: dict = {}
        explicit_keys: set = set()
        for key_node, value_node in node.value:
            line, col = mark(key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"{self.source}:{line}:{col}: a mapping key must be a plain value, "
                                  f"not a {'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
            key = self.loader.construct_object(key_node, deep=True)
            if isinstance(key, str):
                key = _restore(key)
            if id(key_node) in explicit:
                if key in explicit_keys:
                    raise RecipeError(f"{self.source}:{line}:{col}: duplicate key {key!r}")
                explicit_keys.add(key)
            # Point errors about an entry at its key, which is where a reader looks.
            self.positions[path + (key,)] = (line, col)
            out[key] = self.build(value_node, path + (key,))
        return out


def parse_yaml(text: str, path: Path) -> RecipeSource:
    """Parse one YAML document into data and a map of positions (1-based line and column)."""
    safe = REF_RE.sub(lambda m: "$(" + m.group(1) + ")", text)
    for fast in YAML_LOADERS[:-1]:
        try:
            return _parse_yaml(fast, safe, path)
        except RecipeError:
            pass  # read again below: PyYAML's own loader says what is wrong more clearly
    return _parse_yaml(YAML_LOADERS[-1], safe, path)


def _parse_yaml(loader_class: type, safe: str, path: Path) -> RecipeSource:
    loader = loader_class(safe)
    try:
        node = loader.get_single_node()
        data = None
        builder = _Builder(loader, path)
        if node is not None:
            check_expansion(node, "recipe")
            data = builder.build(node)
    except AliasExpansionError as exc:
        raise RecipeError(f"{path}:{exc.line}:{exc.column}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to read: flatten the recipe") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1:1: a recipe is a mapping with `steps:` (got {type(data).__name__})")
    return RecipeSource(path=path, data=data, positions=builder.positions)


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML scalars, so `--set alpha=0.5` is a number."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key.startswith(VAR_PREFIX):
            key = key[len(VAR_PREFIX):]
        if not sep or not key:
            raise RecipeError(f"invalid --set {item!r}: write --set NAME=VALUE, e.g. --set alpha=0.3")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def load_source(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RecipeSource:
    """Read `path`, apply `vars:` (with `overrides`) everywhere and check every `${name}` resolves.

    `${name}` is a variable when `vars:` has it, else a step id or a swept step's point (kept as written,
    resolved at run time to the step's output). A variable alone in a value keeps its type (`weight: ${alpha}` is a
    number); inside a longer string it is interpolated.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    source = parse_yaml(path.read_text(encoding="utf-8"), path.resolve())
    data = source.data
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        raise source.error(("vars",), "vars must be a mapping of NAME: value")
    variables = dict(raw_vars)
    for key, value in (overrides or {}).items():
        if key not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise RecipeError(f"--set {key}: the recipe has no variable {key!r} under vars: (known: {known})")
        variables[key] = value
    steps = data.get("steps") if isinstance(data.get("steps"), dict) else {}
    for name in variables:
        if name in steps:
            raise source.error(("vars", name), f"variable {name!r} has the name of a step; rename one of them")
    data["vars"] = variables
    for key in list(data):
        if key != "vars":
            data[key] = _substitute(data[key], (key,), variables, set(steps), source, _swept_prefixes(steps))
    return source


def _swept_prefixes(steps: dict) -> tuple[str, ...]:
    """`ID-` of every swept step: `${ID-…}` may name one of its points, which exist only once the sweep is
    expanded (the graph checks that the point does)."""
    return tuple(f"{sid}-" for sid, raw in steps.items() if isinstance(raw, dict) and "sweep" in raw)


def _substitute(value: Any, loc: tuple, variables: dict, steps: set, source: RecipeSource,
                swept: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, loc + (k,), variables, steps, source, swept) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, loc + (i,), variables, steps, source, swept) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = REF_RE.fullmatch(value)
    if whole:
        name = whole.group(1)
        name = name[len(VAR_PREFIX):] if name.startswith(VAR_PREFIX) else name
        if name in variables:
            return variables[name]
        if name in steps or (swept and name.startswith(swept)):
            return value
        raise source.error(loc, f"dangling reference ${{{name}}}: no step or variable named {name!r} "
                                f"(steps: {', '.join(sorted(steps)) or 'none'}; vars: {', '.join(sorted(variables)) or 'none'})")

    def repl(match: re.Match) -> str:
        name = match.group(1)
        name = name[len(VAR_PREFIX):] if name.startswith(VAR_PREFIX) else name
        if name in variables:
            return str(variables[name])
        if name in steps:
            raise source.error(loc, f"${{{name}}} names a step: a step reference must be the whole value")
        raise source.error(loc, f"dangling reference ${{{name}}}: no step or variable named {name!r}")

    return REF_RE.sub(repl, value)


def step_ref(value: Any) -> str | None:
    """The step id of a `${step}` value, else None."""
    if isinstance(value, str):
        match = REF_RE.fullmatch(value)
        if match:
            return match.group(1)
    return None


def is_local_path(value: Any) -> bool:
    """A train-config string spelled as a path (./x, ../x, /x or ~/x): digested as a file or folder."""
    from loraforge.reference import written_as_path

    return written_as_path(value)
