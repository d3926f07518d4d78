"""The Evaluator protocol, what is scored (`Subject`), and the factory that builds an evaluator from a metric name.

A metric is named as the user writes it in `--metric` or `metrics:` — a registered evaluator (`clip_score`,
`image_similarity`, `shapes`, …) or `python:module:function` — and that name is the key its scores are recorded
under. An evaluator scores images against the prompts they were drawn from, one float per image. Two methods are
optional: `check_prompts(prompts)` refuses prompts it cannot score before anything is rendered (the shapes judge
reads only its world's words), and `for_subject(subject)` gives the evaluator to use for one subject's images
(image_similarity's default reference is the artifact's training images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from loraforge.errors import ConfigError, PluginError

PYTHON_PREFIX = "python:"


@runtime_checkable
class Evaluator(Protocol):
    """Scores images (one float each); `name` is the metric name, `version` is recorded with every score."""

    name: str
    version: str

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        ...


@dataclass(frozen=True)
class Subject:
    """One thing `eval` renders and scores: a registry artifact, or a bare base model (no adapter).

    `label` is the reference as the user wrote it (the table's row name); `ref` the exact `name:version` of a
    registry artifact (None for a bare base); `base` the model it is rendered on; `adapters` the exact
    references loaded into that model; `manifest` the artifact's manifest (None for a bare base)."""

    label: str
    kind: str
    base: str
    ref: Optional[str] = None
    adapters: tuple[str, ...] = ()
    manifest: Any = field(default=None, compare=False, repr=False)


def metric_plugin(metric: str) -> str:
    """The EVALUATORS plugin name a metric runs (`python` for `python:module:function`)."""
    return "python" if metric.strip().startswith(PYTHON_PREFIX) else metric.strip()


def unknown_metric(metric: str, installed: list[str]) -> ConfigError:
    names = ", ".join(n for n in installed if n != "python") or "none installed"
    return ConfigError(f"unknown metric {metric!r}: installed evaluators are {names}, or python:module:function")


def load_evaluator(metric: str, options: dict[str, Any] | None = None, *, registry=None) -> Evaluator:
    """The evaluator of `metric` configured with `options`; evaluators that read the registry (a reference
    dataset) take `registry`. Construction checks what can be checked up front (model folders, functions), so a
    bad metric fails before anything is rendered."""
    from loraforge.plugins import EVALUATORS

    metric = metric.strip()
    options = dict(options or {})
    name = metric_plugin(metric)
    if name == "python":
        function = metric[len(PYTHON_PREFIX):] if metric.startswith(PYTHON_PREFIX) else None
        if function is None:
            raise ConfigError("metric 'python' needs its function: write python:module:function")
        options["function"] = function
    try:
        info = EVALUATORS.info(name)
    except PluginError:
        raise unknown_metric(metric, EVALUATORS.names()) from None
    evaluator = EVALUATORS.construct(info, options, label=f"metric {metric!r}", error=ConfigError,
                                     wrap_function=lambda fn, version: FunctionEvaluator(fn, metric, version),
                                     registry=registry, hidden=("function",) if name == "python" else ())
    evaluator.name = metric
    return evaluator


def check_prompts(evaluator: Evaluator, prompts: Sequence[str]) -> None:
    """Let an evaluator refuse prompts it cannot score (its optional `check_prompts`) before anything renders."""
    check = getattr(evaluator, "check_prompts", None)
    if callable(check):
        check(list(prompts))


def for_subject(evaluator: Evaluator, subject: Subject) -> Evaluator:
    """The evaluator that scores `subject`'s images (the evaluator itself unless it depends on the subject)."""
    bind = getattr(evaluator, "for_subject", None)
    return bind(subject) if callable(bind) else evaluator


class FunctionEvaluator:
    """A plain `fn(images, prompts) -> list[float]` (an entry-point plugin) as an Evaluator."""

    def __init__(self, fn, name: str, version: str):
        self.fn, self.name, self.version = fn, name, version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return check_scores(self.name, call_user_function(self.name, self.fn, images, prompts), len(images))


def call_user_function(name: str, fn, images: Sequence, prompts: Sequence[str]):
    """`fn(images, prompts)`; a failure of someone else's code is one line naming the metric (--debug: its
    traceback), and no metric of the run is recorded."""
    try:
        return fn(list(images), list(prompts))
    except Exception as exc:
        raise ConfigError(f"metric {name!r} failed: {type(exc).__name__}: {exc}") from exc


def check_scores(name: str, scores, n: int, noun: str = "metric", error: type[Exception] = ConfigError) -> list[float]:
    """`scores` as n finite floats, or `error` naming the `noun` (metric, reward) and its name."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise error(f"{noun} {name!r} returned {type(scores).__name__}, not a list of numbers") from None
    if len(values) != n:
        raise error(f"{noun} {name!r} returned {len(values)} scores for {n} images")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise error(f"{noun} {name!r} returned a non-finite score: {values}")
    return values
