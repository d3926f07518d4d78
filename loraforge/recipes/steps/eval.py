"""`eval:` steps: score artifacts on the same prompts and seeds, record each one's metrics, register a report.

The report (an artifact of kind `report`) holds the table as CSV and JSON, the bar chart and the image grid.
Its input digest covers the refs' digests, every metric's evaluator version, the prompts (a prompt file's bytes),
seeds and sampler settings, so a second apply on the same inputs does nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from loraforge.errors import LoraforgeError
from loraforge.plugins import EVALUATORS, STEP_KINDS
from loraforge.recipes.loader import is_local_path, step_ref
from loraforge.recipes.schema import Recipe, Step
from loraforge.recipes.step_kind import Spec, SpecReference, StepContext, StepKind, nested_references
from loraforge.registry.manifest import Manifest, Parent, Provenance


class EvalSpec(Spec):
    refs: list[str] = Field(min_length=1, description="Artifacts to score: registry references, `${step}` outputs, "
                                                       "`base` (the base with no adapter) or builtin:NAME.")
    metrics: list[str] = Field(min_length=1, description="Evaluators: clip_score, image_similarity, shapes, another "
                                                          "installed one, or python:module:function.")
    metric_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options per metric, e.g. {clip_score: {model: ./clip}, "
                                          "image_similarity: {reference: faces:1}}.")
    prompts: Optional[list[str]] = Field(None, description="Prompts every artifact is rendered on.")
    prompt_file: Optional[str] = Field(None, description="A text file of prompts, one a line (instead of prompts).")
    seeds: list[int] = Field([0, 1], min_length=1, description="Seeds; every prompt is rendered with every seed.")
    steps: int = Field(20, ge=1, description="Denoising steps per image.")
    guidance: float = Field(7.5, description="Classifier-free guidance scale.")
    size: Optional[int] = Field(None, ge=8, description="Image size in pixels (default: the model's).")
    base: Optional[str] = Field(None, description="Base every adapter is rendered on, and what `base` in refs means "
                                                  "(default: each adapter's own base).")
    title: Optional[str] = Field(None, description="Title of the chart and grid (default: recipe name and step id).")

    @model_validator(mode="after")
    def _prompts_one_way(self) -> "EvalSpec":
        from loraforge.render.generate import size_problem

        if (self.prompts is None) == (self.prompt_file is None):
            raise ValueError("give prompts (a list) or prompt_file, exactly one of them")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        problem = size_problem(self.size)
        if problem:
            raise ValueError(problem)
        unused = sorted(set(self.metric_options) - set(self.metrics))
        if unused:
            raise ValueError(f"metric_options names {', '.join(unused)}, which is not among the metrics")
        return self


@STEP_KINDS.register("eval")
class EvalStep(StepKind):
    """Score artifacts with evaluators; record their metrics and register a report (table, chart, grid)."""

    spec_class = EvalSpec

    def output_kind(self, spec: EvalSpec) -> str:
        return "report"

    def references(self, spec: EvalSpec) -> list[SpecReference]:
        from loraforge.evaluators.evaluate import BASE_LITERAL

        refs = [SpecReference(("refs", i), "artifact", r) for i, r in enumerate(spec.refs) if r != BASE_LITERAL]
        if spec.base:
            refs.append(SpecReference(("base",), "model", spec.base))
        if spec.prompt_file:
            refs.append(SpecReference(("prompt_file",), "path", spec.prompt_file))
        for metric, options in spec.metric_options.items():
            for key, value in options.items():
                loc = ("metric_options", metric, key)
                if key == "reference" and isinstance(value, str) and not (step_ref(value) or is_local_path(value)):
                    refs.append(SpecReference(loc, "artifact", value))  # a dataset artifact: its digest counts
                else:
                    refs += nested_references(loc, key, value)
        return refs

    def plugins(self, spec: EvalSpec):
        """Every metric's evaluator; a python:module:function also as itself, whose version is the function's."""
        from loraforge.evaluators.base import PYTHON_PREFIX, metric_plugin
        from loraforge.evaluators.python_fn import USER_FUNCTIONS

        found = []
        for metric in (m.strip() for m in spec.metrics):
            if metric_plugin(metric) not in EVALUATORS:
                continue  # left to `check`, which names the metric as written and where it is
            found.append((EVALUATORS, metric_plugin(metric)))
            if metric.startswith(PYTHON_PREFIX):
                try:
                    USER_FUNCTIONS.info(metric)
                except LoraforgeError:
                    continue  # `check` refuses it with its position
                found.append((USER_FUNCTIONS, metric))
        return found

    def check(self, recipe: Recipe, step: Step) -> None:
        """Every metric is an installed evaluator, and a python:module:function imports."""
        from loraforge.evaluators.base import PYTHON_PREFIX, metric_plugin, unknown_metric
        from loraforge.evaluators.python_fn import PythonFunctionEvaluator

        for i, metric in enumerate(step.spec.metrics):
            loc = ("steps", step.id, step.kind, "metrics", i)
            try:
                if metric_plugin(metric) not in EVALUATORS:
                    raise unknown_metric(metric, EVALUATORS.names())
                if metric.strip().startswith(PYTHON_PREFIX):
                    PythonFunctionEvaluator(metric.strip()[len(PYTHON_PREFIX):])
            except LoraforgeError as exc:
                raise recipe.source.error(loc, str(exc)) from None

    def run(self, ctx: StepContext) -> Manifest:
        from loraforge.evaluators.evaluate import EvalSettings, evaluate, read_prompt_file
        from loraforge.home import tmp_dir

        spec = ctx.spec
        prompts = list(spec.prompts) if spec.prompts is not None else read_prompt_file(Path(spec.prompt_file))
        report = evaluate(ctx.registry, spec.refs, prompts=prompts, seeds=spec.seeds, metrics=spec.metrics,
                          settings=EvalSettings(steps=spec.steps, guidance=spec.guidance, size=spec.size),
                          base=spec.base, metric_options=spec.metric_options)
        title = spec.title or f"{ctx.recipe.name} / {ctx.step.id}"
        parents = [Parent(ref=s.ref, digest=s.manifest.digest, role="input") for s in report.subjects if s.ref]
        manifest = Manifest(
            name=ctx.output, kind="report", digest="", files=[],
            provenance=Provenance(method="eval", params=spec.model_dump(mode="json")),
            metrics={"artifacts": len(report.subjects), "images": len(report.subjects) * len(report.rows)},
        )
        manifest = ctx.stamp(manifest, parents=parents)
        ctx.echo("\n".join(f"  {s.label}: " + ", ".join(f"{m}={report.means[s.label][m]:.4f}" for m in report.metrics)
                           for s in report.subjects) + f"\n  {report.rendered} image(s) rendered, {report.cached} cached")
        with tempfile.TemporaryDirectory(dir=tmp_dir(ctx.registry.home), prefix="eval-") as tmp:
            folder = Path(tmp)
            (folder / "table.csv").write_text(report.csv_text(), encoding="utf-8")
            # What the cache held is no part of the result: the same scores give the same report bytes.
            table = {k: v for k, v in report.to_json().items() if k not in ("rendered", "cached")}
            (folder / "table.json").write_text(json.dumps(table, indent=2, sort_keys=True), encoding="utf-8")
            report.chart(title=title).save(folder / "chart.png", format="PNG")
            report.grid(title=title).save(folder / "grid.png", format="PNG")
            files = [(folder / n, n) for n in ("table.csv", "table.json", "chart.png", "grid.png")]
            return ctx.registry.register(manifest, files, input_digest=ctx.input_digest)
