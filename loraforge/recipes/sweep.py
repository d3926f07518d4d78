"""Sweeps: a step with `sweep: {KEY: [values]}` becomes one step per point of the product of its lists.

Expansion works on the recipe's plain data, before steps are validated, so every point is an
ordinary step (its own id, output name and input digest: a changed list value rebuilds only the
points that are new). A point's id is the swept step's id followed by its values, so it stays the
same while its values do. `sweep_overrides: {METHOD: {KEY: value}}` sets keys for the points of
one swept method (a list for a swept key replaces that method's values; null leaves the key out).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from loraforge.recipes.loader import RecipeSource, step_ref

MAX_POINTS = 64
SWEEP, OVERRIDES = "sweep", "sweep_overrides"
_SCALARS = (str, int, float, bool)


class _LeftOut:
    """A swept key a method's `sweep_overrides` sets to null: its points leave the key out."""


_LEFT_OUT = _LeftOut()


@dataclass(frozen=True)
class SweepPoint:
    """One point of a swept step: the step id as written and the values of the point, in sweep order."""

    step: str
    values: tuple[tuple[str, Any], ...]


@dataclass
class Expanded:
    """The recipe's steps with every sweep expanded, and what each swept step became."""

    steps: dict[str, Any]  # step id → raw step (points in place of their swept step)
    publish: list  # the publish entries, `${swept}` list items expanded
    points: dict[str, SweepPoint]  # point id → its point
    origins: dict[str, dict[str, tuple]]  # point id → spec key → where its value is written
    sweeps: dict[str, tuple[str, ...]]  # swept step id → its point ids, in sweep order


def value_slug(value: Any) -> str:
    """A swept value as part of a step id: `${step}` by the step's name, other characters as `_`."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    ref = step_ref(text)
    text = ref if ref is not None else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def expand_sweeps(source: RecipeSource, raw_steps: dict, raw_publish: list, kind_names: list[str]) -> Expanded:
    """Expand every `sweep:` of `raw_steps`, and the `${swept}` list items and `after:` names that read them."""
    out: dict[str, Any] = {}
    points: dict[str, SweepPoint] = {}
    origins: dict[str, dict[str, tuple]] = {}
    sweeps: dict[str, tuple[str, ...]] = {}
    for step_id, raw in raw_steps.items():
        step_id = str(step_id)
        if not isinstance(raw, dict) or (SWEEP not in raw and OVERRIDES not in raw):
            out[step_id] = raw
            continue
        loc = ("steps", step_id)
        if SWEEP not in raw:
            raise source.error(loc + (OVERRIDES,), "sweep_overrides without a sweep: add `sweep:` or remove it")
        kinds = [k for k in raw if k in kind_names]
        if len(kinds) != 1 or not isinstance(raw[kinds[0]], dict):
            out[step_id] = raw  # parse_step says what is wrong with the step itself
            continue
        ids = []
        for point_id, point_raw, values, where in _points(source, step_id, raw, kinds[0]):
            if point_id in raw_steps or point_id in out:
                raise source.error(loc + (SWEEP,), f"sweep point id {point_id!r} is taken by another step: "
                                                   "rename that step or change the sweep's values")
            out[point_id] = point_raw
            points[point_id] = SweepPoint(step_id, values)
            origins[point_id] = where
            ids.append(point_id)
            _copy_positions(source, loc, ("steps", point_id))
            for key, at in where.items():  # a swept value is written in the sweep, not in the spec
                _copy_positions(source, at, ("steps", point_id, kinds[0], key), overwrite=True)
        sweeps[step_id] = tuple(ids)
    if sweeps:
        snapshot = dict(source.positions)
        for step_id, raw in out.items():
            if isinstance(raw, dict):
                out[step_id] = _expand_refs(source, snapshot, ("steps", step_id), raw, sweeps, top=True)
        raw_publish = [_expand_refs(source, snapshot, ("publish", i), entry, sweeps)
                       for i, entry in enumerate(raw_publish)]
    return Expanded(out, list(raw_publish), points, origins, sweeps)


def _points(source: RecipeSource, step_id: str, raw: dict, kind: str):
    """(point id, raw step, values, spec key → position of its value) for each point, in sweep order."""
    loc = ("steps", step_id)
    sweep = raw[SWEEP]
    if not isinstance(sweep, dict) or not sweep:
        raise source.error(loc + (SWEEP,), "sweep is a mapping of KEY: [value, ...], e.g. "
                                           "sweep: {learning_rate: [1e-4, 5e-5]}")
    for key, values in sweep.items():
        at = loc + (SWEEP, key)
        if not isinstance(key, str):
            raise source.error(at, f"sweep key {key!r} is not a spec key name")
        if not isinstance(values, list):
            raise source.error(at, f"sweep key {key!r} needs a list of values (got {values!r}): "
                                   f"write {key}: [{values!r}, ...]")
        _check_values(source, at, key, values)
    overrides = raw.get(OVERRIDES) or {}
    if not isinstance(overrides, dict):
        raise source.error(loc + (OVERRIDES,), "sweep_overrides is a mapping of METHOD: {KEY: value}")
    if overrides and "method" not in sweep:
        raise source.error(loc + (OVERRIDES,), "sweep_overrides sets keys per swept method: "
                                               "add `method: [...]` to sweep:")
    for method, settings in overrides.items():
        at = loc + (OVERRIDES, method)
        if method not in sweep["method"]:
            raise source.error(at, f"sweep_overrides: {method!r} is not a swept method "
                                   f"(sweep.method: {', '.join(map(str, sweep['method']))})")
        if not isinstance(settings, dict) or not settings:
            raise source.error(at, f"sweep_overrides.{method} is a mapping of KEY: value")
        for key, value in settings.items():
            if key == "method":
                raise source.error(at + (key,), "sweep_overrides cannot change the method itself")
            if key in sweep and value is not None:
                if not isinstance(value, list):
                    raise source.error(at + (key,), f"{key!r} is swept: give {method}'s own list of values "
                                                    f"({key}: [{value!r}]) or null to leave it out")
                _check_values(source, at + (key,), key, value)

    spec = raw[kind]
    keys = list(sweep)
    found = []
    for choice in _choices(loc, sweep, overrides):
        values = tuple((k, v) for k, (_, v, _) in zip(keys, choice) if v is not _LEFT_OUT)
        point_spec = {k: v for k, v in spec.items()}
        where = {}
        for k, (_, v, at) in zip(keys, choice):
            if v is _LEFT_OUT:
                point_spec.pop(k, None)
            else:
                point_spec[k] = v
                where[k] = at
        method = dict(values).get("method")
        for k, v in (overrides.get(method) or {}).items() if method is not None else ():
            if k in sweep:
                continue
            if v is None:
                point_spec.pop(k, None)
            else:
                point_spec[k] = v
                where[k] = loc + (OVERRIDES, method, k)
        point_raw = {k: v for k, v in raw.items() if k not in (SWEEP, OVERRIDES, kind)}
        point_raw[kind] = point_spec
        suffix = "-".join(value_slug(v) for _, v in values)
        point_id = f"{step_id}-{suffix}"
        if raw.get("output") is not None:
            point_raw["output"] = f"{raw['output']}-{suffix}"
        order = tuple(index for index, _, _ in choice)
        found.append((order, point_id, point_raw, values, where))
    if len(found) > MAX_POINTS:
        raise source.error(loc + (SWEEP,), f"sweep of {step_id!r} makes {len(found)} points, more than "
                                           f"{MAX_POINTS}: sweep fewer values or split it into several steps")
    seen: dict[str, tuple] = {}
    for _, point_id, _, values, _ in found:
        if point_id in seen:
            raise source.error(loc + (SWEEP,), f"sweep points {_describe(seen[point_id])} and {_describe(values)} "
                                               f"get the same step id {point_id!r}: use values that differ "
                                               "in letters or digits")
        seen[point_id] = values
    found.sort(key=lambda f: f[0])
    return [(point_id, point_raw, values, where) for _, point_id, point_raw, values, where in found]


def _choices(loc: tuple, sweep: dict, overrides: dict):
    """Every point as one (index, value, position of the value) per sweep key.

    A swept method's own list in `sweep_overrides` replaces the key's list for that method's points.
    """
    keys = list(sweep)
    methods = sweep.get("method")
    for method in [None] if methods is None else methods:
        own = (overrides.get(method) or {}) if method is not None else {}
        lists = []
        for key in keys:
            if key == "method":
                index = methods.index(method)
                lists.append([(index, method, loc + (SWEEP, key, index))])
            elif key in own and own[key] is None:
                lists.append([(0, _LEFT_OUT, None)])
            elif key in own:
                lists.append([(i, v, loc + (OVERRIDES, method, key, i)) for i, v in enumerate(own[key])])
            else:
                lists.append([(i, v, loc + (SWEEP, key, i)) for i, v in enumerate(sweep[key])])
        yield from itertools.product(*lists)


def _check_values(source: RecipeSource, at: tuple, key: str, values: list) -> None:
    if not values:
        raise source.error(at, f"sweep key {key!r} has an empty list: give at least one value")
    for i, value in enumerate(values):
        if not isinstance(value, _SCALARS):
            raise source.error(at + (i,), f"sweep value {value!r} of {key!r} is not a number, string or "
                                          "boolean: sweep scalars, one key per setting")
    for i, value in enumerate(values):
        if any(value == other and type(value) is type(other) for other in values[:i]):
            raise source.error(at + (i,), f"sweep key {key!r} lists {value!r} twice")


def _describe(values: tuple) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in values) + "}"


def _copy_positions(source: RecipeSource, old: tuple, new: tuple, overwrite: bool = False) -> None:
    """Positions of `old` and below, also under `new` (errors about a point point at what its step wrote)."""
    n = len(old)
    for loc, mark in list(source.positions.items()):
        if loc[:n] == old:
            if overwrite:
                source.positions[new + loc[n:]] = mark
            else:
                source.positions.setdefault(new + loc[n:], mark)


def _expand_refs(source: RecipeSource, snapshot: dict, loc: tuple, value: Any, sweeps: dict, top: bool = False) -> Any:
    """`value` with each `${swept}` list item replaced by its points' references; a scalar one is refused."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if top and key == "after" and isinstance(item, list):
                result[key] = _expand_after(source, snapshot, loc + (key,), item, sweeps)
            elif top and key in ("output", "description"):
                result[key] = item
            else:
                result[key] = _expand_refs(source, snapshot, loc + (key,), item, sweeps)
        return result
    if isinstance(value, list):
        items: list = []
        moved: list[tuple[int, int]] = []
        for i, item in enumerate(value):
            target = step_ref(item)
            if target in sweeps:
                for point_id in sweeps[target]:
                    moved.append((i, len(items)))
                    items.append("${" + point_id + "}")
            else:
                moved.append((i, len(items)))
                items.append(_expand_refs(source, snapshot, loc + (i,), item, sweeps))
        if len(items) != len(value):
            _renumber(source, snapshot, loc, moved)
        return items
    target = step_ref(value)
    if target in sweeps:
        raise source.error(loc, f"${{{target}}} is a swept step ({len(sweeps[target])} points): use it inside a "
                                f"list, e.g. refs: [${{{target}}}], which reads every point, or name one point, "
                                f"e.g. ${{{sweeps[target][0]}}}")
    return value


def _expand_after(source: RecipeSource, snapshot: dict, loc: tuple, names: list, sweeps: dict) -> list:
    items: list = []
    moved: list[tuple[int, int]] = []
    for i, name in enumerate(names):
        for new in sweeps.get(name, (name,)) if isinstance(name, str) else (name,):
            moved.append((i, len(items)))
            items.append(new)
    if len(items) != len(names):
        _renumber(source, snapshot, loc, moved)
    return items


def _renumber(source: RecipeSource, snapshot: dict, loc: tuple, moved: list[tuple[int, int]]) -> None:
    """Positions of a list whose items moved (old index → new index), read from before the move."""
    n = len(loc)
    for key in [k for k in source.positions if k[:n] == loc and len(k) > n]:
        del source.positions[key]
    for old, new in moved:
        for key, mark in snapshot.items():
            if key[:n] == loc and len(key) > n and key[n] == old:
                source.positions[loc + (new,) + key[n + 1:]] = mark


def check_point_keys(source: RecipeSource, swept_id: str, points: list, raw_specs: dict[str, dict],
                     origins: dict[str, dict[str, tuple]]) -> None:
    """Every key of every point is one its spec takes (a train point: one its method's trainer takes)."""
    accepted = {p.id: p.definition.spec_keys(p.spec) for p in points}
    for point in points:
        keys = accepted[point.id]
        if keys is None:
            continue
        for key in raw_specs[point.id]:
            if key in keys:
                continue
            origin = origins[point.id].get(key)
            swept = origin is not None and origin[2] == SWEEP
            if swept and not any(others is None or key in others for others in accepted.values()):
                known = f" (it takes: {', '.join(sorted(keys))})" if len(keys) <= 40 else ""
                raise source.error(("steps", swept_id, SWEEP, key),
                                   f"sweep key {key!r}: this {point.kind} step has no key {key!r}{known}")
            where = origin[:-1] if origin is not None and isinstance(origin[-1], int) else origin
            where = where or ("steps", swept_id, point.kind, key)
            method = getattr(point.spec, "method", None)
            if method is None:
                raise source.error(where, f"this {point.kind} step has no key {key!r} (sweep point {point.id})")
            raise source.error(where, f"method {method!r} takes no {key!r} (sweep point {point.id}): leave it out "
                                      f"for that method with sweep_overrides: {{{method}: {{{key}: null}}}}")


__all__ = ["MAX_POINTS", "Expanded", "SweepPoint", "check_point_keys", "expand_sweeps", "value_slug"]
