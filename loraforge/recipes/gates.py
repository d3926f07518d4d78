"""Publish gates: the scores an artifact must have before a recipe's `publish:` entry pushes it.

A gate reads the metrics recorded for the exact version being published (`registry.evaluations`);
`no_regression_vs: previous` compares with the newest earlier version of the same name that has the
metric. A metric that was never scored blocks the push: a gate that cannot be checked is not passed.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraforge.errors import LoraforgeError


class GateFailed(LoraforgeError):
    """An artifact's metrics do not pass a publish gate, so it is not pushed."""


class Gate(BaseModel):
    """Bounds on one metric of the artifact a publish entry pushes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min: Optional[float] = Field(None, description="Lowest value that may be published.")
    max: Optional[float] = Field(None, description="Highest value that may be published.")
    no_regression_vs: Optional[Literal["previous"]] = Field(
        None, description="previous: no worse than the newest earlier version of the same name with this metric.")
    tolerance: float = Field(0.0, ge=0, description="How much worse than the previous version still publishes.")
    better: Literal["higher", "lower"] = Field("higher", description="Which direction of the metric is better "
                                                                     "(what a regression is).")

    @model_validator(mode="after")
    def _bounds(self) -> "Gate":
        if self.min is None and self.max is None and self.no_regression_vs is None:
            raise ValueError("a gate needs min, max or no_regression_vs: previous")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} > max {self.max:g}: no value passes; swap them")
        if self.tolerance and self.no_regression_vs is None:
            raise ValueError("tolerance applies to no_regression_vs: add no_regression_vs: previous or drop it")
        return self


def _num(value: float) -> str:
    return f"{value:.4g}"


def check_gates(registry, ref: str, gates: dict[str, Gate], echo: Callable[[str], None] = lambda s: None) -> None:
    """Raise GateFailed naming the first metric of exact version `ref` that fails its gate; echo the passes."""
    from loraforge.registry.evaluations import metrics_of

    manifest = registry.resolve(ref)
    ref = manifest.ref
    metrics = metrics_of(registry, ref)
    failures: list[str] = []
    for metric, gate in gates.items():
        record = metrics.get(metric)
        if record is None:
            failures.append(f"{ref} has no {metric} score: score it first (an eval step with refs: [{ref}] "
                            f"and metrics: [{metric}], or `loraforge eval {ref} --metric {metric}`)")
            continue
        value = float(record["value"])
        if gate.min is not None and value < gate.min:
            failures.append(f"{metric} {_num(value)} < min {_num(gate.min)} for {ref}")
            continue
        if gate.max is not None and value > gate.max:
            failures.append(f"{metric} {_num(value)} > max {_num(gate.max)} for {ref}")
            continue
        bounds = [f">= min {_num(gate.min)}"] if gate.min is not None else []
        bounds += [f"<= max {_num(gate.max)}"] if gate.max is not None else []
        if bounds:
            echo(f"gate {metric}: {_num(value)} {' and '.join(bounds)} for {ref}")
        if gate.no_regression_vs == "previous":
            failures += _no_regression(registry, manifest, metric, value, gate, echo)
    if failures:
        others = len(failures) - 1
        more = f" (and {others} more failing gate{'s' if others > 1 else ''})" if others else ""
        raise GateFailed(f"publish blocked: {failures[0]}{more}")


def previous_score(registry, manifest, metric: str) -> Optional[tuple[str, float]]:
    """(ref, value) of `metric` on the newest version of `manifest`'s name before it that has one."""
    from loraforge.registry.evaluations import metrics_of

    versions = sorted((row["version"] for row in registry.list(name=manifest.name)
                       if row["version"] < manifest.version), reverse=True)
    for version in versions:
        record = metrics_of(registry, f"{manifest.name}:{version}").get(metric)
        if record is not None:
            return f"{manifest.name}:{version}", float(record["value"])
    return None


def _no_regression(registry, manifest, metric: str, value: float, gate: Gate, echo) -> list[str]:
    previous = previous_score(registry, manifest, metric)
    if previous is None:
        echo(f"gate {metric}: no earlier version of {manifest.name} has a {metric} score, "
             f"so no_regression_vs: previous passes for {manifest.ref}")
        return []
    prev_ref, prev = previous
    tolerance = f", tolerance {_num(gate.tolerance)}" if gate.tolerance else ""
    if gate.better == "higher":
        bound, worse, sign = prev - gate.tolerance, value < prev - gate.tolerance, "<"
    else:
        bound, worse, sign = prev + gate.tolerance, value > prev + gate.tolerance, ">"
    said = f"({prev_ref} scored {_num(prev)}{tolerance})"
    if worse:
        return [f"{metric} {_num(value)} {sign} {_num(bound)} {said} for {manifest.ref}"]
    echo(f"gate {metric}: {_num(value)} {'>=' if sign == '<' else '<='} {_num(bound)} {said} for {manifest.ref}")
    return []


def scoring_steps(recipe, artifact: str) -> dict[str, set[str]]:
    """Step id → metric names, for every step that scores `artifact` (a reference as written)."""
    out: dict[str, set[str]] = {}
    for step in recipe.steps.values():
        for ref, metrics in step.definition.scores(step.spec):
            if ref == artifact:
                out.setdefault(step.id, set()).update(metrics)
    return out


__all__ = ["Gate", "GateFailed", "check_gates", "previous_score", "scoring_steps"]
