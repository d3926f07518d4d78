"""Scoring artifacts side by side: render each on the same prompts and seeds, score the images, record the means.

Used by `loraforge eval` and the recipe `eval` step. Rendered images are cached on disk under the home's cache,
keyed by what decides their pixels (the base's and adapters' digests, prompt, seed, steps, guidance, size, device
and dtype), so scoring again — with another metric, or after adding an artifact — renders only what is new. Each
image is drawn alone from its own seed, as `loraforge generate` draws it, so a score can be checked image by image.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loraforge.errors import ConfigError
from loraforge.evaluators.base import Subject, check_prompts, check_scores, for_subject, load_evaluator
from loraforge.hashing import sha256_json
from loraforge.home import cache_dir

BASE_LITERAL = "base"  # in the refs: the base model itself, no adapter
ADAPTER_KINDS = ("lora", "slider", "embedding")


@dataclass(frozen=True)
class EvalSettings:
    """How every image is drawn: the same for every artifact, so their scores compare."""

    steps: int = 20
    guidance: float = 7.5
    size: Optional[int] = None

    def check(self) -> None:
        from loraforge.render.generate import check_generation

        check_generation(self.steps, self.size)


@dataclass
class EvalReport:
    """What an evaluation found: per subject, the mean of each metric and every image's score."""

    subjects: list[Subject]
    metrics: list[str]
    prompts: list[str]
    seeds: list[int]
    settings: EvalSettings
    evaluator_versions: dict[str, str]
    means: dict[str, dict[str, float]]  # label → metric → mean over prompts × seeds
    scores: dict[str, dict[str, list[float]]]  # label → metric → one score per image, prompt-major
    images: dict[str, list] = field(repr=False, default_factory=dict)  # label → images, prompt-major
    samplers: dict[str, str] = field(default_factory=dict)  # label → the base's scheduler
    rendered: int = 0
    cached: int = 0

    @property
    def rows(self) -> list[tuple[str, int]]:
        """(prompt, seed) of each image, in the order of `images` and `scores`."""
        return [(p, s) for p in self.prompts for s in self.seeds]

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """(headers, rows) of the methods × metrics table."""
        headers = ["ref", "artifact", "kind", *self.metrics]
        return headers, [[s.label, s.ref or "", s.kind, *(self.means[s.label][m] for m in self.metrics)]
                         for s in self.subjects]

    def to_json(self) -> dict:
        return {
            "metrics": self.metrics, "evaluators": self.evaluator_versions, "prompts": self.prompts,
            "seeds": self.seeds, "settings": {"steps": self.settings.steps, "guidance": self.settings.guidance,
                                              "size": self.settings.size},
            "rendered": self.rendered, "cached": self.cached,
            "results": [{"ref": s.label, "artifact": s.ref, "kind": s.kind, "base": s.base,
                         "sampler": self.samplers.get(s.label), "metrics": self.means[s.label],
                         "scores": self.scores[s.label]} for s in self.subjects],
        }

    def csv_text(self) -> str:
        headers, rows = self.table()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows([[*row[:3], *(repr(float(v)) for v in row[3:])] for row in rows])
        return out.getvalue()

    def short_labels(self) -> tuple[list[str], str]:
        """The subjects' labels without the name prefix most of them share (a recipe's and a sweep's,
        `personalise-compare-personalise-` of `personalise-compare-personalise-lora-0.001:1`), and that prefix:
        what fits under a chart bar or above a grid column. Labels stay as they are when fewer than two share one."""
        labels = [s.label for s in self.subjects]
        candidates = {label[:i + 1] for label in labels for i, c in enumerate(label) if c == "-"}
        best, shared = "", 1
        for prefix in candidates:
            n = sum(label.startswith(prefix) and len(label) > len(prefix) for label in labels)
            if n > shared or (n == shared and n > 1 and len(prefix) > len(best)):
                best, shared = prefix, n
        if not best:
            return labels, ""
        return [label[len(best):] if label.startswith(best) else label for label in labels], best

    def _titled(self, title: str | None, prefix: str) -> str | None:
        return f"{title}  ({prefix}…)" if (title and prefix) else (title or (f"{prefix}…" if prefix else None))

    def chart(self, title: str | None = None):
        from loraforge.render.chart import bar_chart

        labels, prefix = self.short_labels()
        title = title or f"mean over {len(self.prompts)} prompt(s) x {len(self.seeds)} seed(s)"
        return bar_chart(labels, self.metrics,
                         [[self.means[s.label][m] for m in self.metrics] for s in self.subjects],
                         title=self._titled(title, prefix))

    def grid(self, title: str | None = None):
        """Rows: prompt (and seed), columns: the subjects, labelled."""
        from loraforge.render.grid import image_grid

        cells = [[self.images[s.label][i] for s in self.subjects] for i in range(len(self.rows))]
        labels = [p if len(self.seeds) == 1 else f"{p} | seed {s}" for p, s in self.rows]
        columns, prefix = self.short_labels()
        return image_grid(cells, labels, columns, title=self._titled(title, prefix))


def resolve_subjects(registry, refs: Sequence[str], base: Optional[str] = None) -> list[Subject]:
    """What each reference renders as: an adapter on its manifest's base (or `base`), a checkpoint as the base
    itself, and the literal `base` or a `builtin:NAME` / model path as a base with no adapter."""
    from loraforge.reference import Reference
    from loraforge.registry.importer import detect_kind
    from loraforge.registry.resolve import resolve_artifact

    if not refs:
        raise ConfigError("nothing to evaluate: give at least one REF (an artifact, `base` or builtin:NAME)")
    seen: set[str] = set()
    subjects: list[Optional[Subject]] = []
    for text in refs:
        if text in seen:
            raise ConfigError(f"{text} is given twice: give each artifact once")
        seen.add(text)
        if text == BASE_LITERAL:
            subjects.append(None)  # filled below, once the adapters' bases are known
            continue
        ref = Reference.parse(text)
        if ref.kind == "path" and detect_kind(ref.path) != "checkpoint":
            raise ConfigError(f"{text} is a local file or folder, not a model: import it first (`loraforge registry "
                              f"import {text} --name NAME`, or an import: step), so its scores belong to a version")
        if ref.kind in ("builtin", "path", "hub_model"):
            subjects.append(Subject(label=text, kind="base", base=text))
            continue
        manifest = resolve_artifact(registry, ref)
        if manifest.kind in ADAPTER_KINDS:
            on = base or (manifest.base.ref if manifest.base else None)
            if on is None:
                raise ConfigError(f"{text} records no base model: give --base")
            subjects.append(Subject(label=text, kind=manifest.kind, base=on, ref=manifest.ref,
                                    adapters=(manifest.ref,), manifest=manifest))
        elif manifest.kind == "checkpoint":
            subjects.append(Subject(label=text, kind="checkpoint", base=manifest.ref, ref=manifest.ref,
                                    manifest=manifest))
        else:
            article = "an" if manifest.kind[0] in "aeiou" else "a"
            raise ConfigError(f"{text} is {article} {manifest.kind}, which does not render: give a lora, slider, "
                              "embedding or checkpoint, `base` or builtin:NAME")
    if None in subjects:
        bases = sorted({s.base for s in subjects if s is not None and s.adapters})
        on = base or (bases[0] if len(bases) == 1 else None)
        if on is None:
            found = f"the adapters are on {', '.join(bases)}" if bases else "no adapter names one"
            raise ConfigError(f"`base` in the refs renders the base model, but {found}: give --base")
        subjects = [s or Subject(label=BASE_LITERAL, kind="base", base=on) for s in subjects]
    return subjects


def evaluate(registry, refs: Sequence[str], *, prompts: Sequence[str], seeds: Sequence[int],
             metrics: Sequence[str], settings: EvalSettings = EvalSettings(), base: Optional[str] = None,
             metric_options: Optional[dict[str, dict]] = None, record: bool = True,
             progress: Optional[Callable[..., None]] = None) -> EvalReport:
    """Render `refs` on `prompts` × `seeds`, score them with every metric and (with `record`) store each registry
    artifact's means as its metrics. Everything that can be refused is refused before the first image renders."""
    from loraforge.registry.evaluations import record_metrics

    prompts, seeds, metrics = list(prompts), [int(s) for s in seeds], list(metrics)
    if not prompts:
        raise ConfigError("no prompts: give --prompt (repeatable) or --prompt-file")
    if not seeds:
        raise ConfigError("no seeds: give --seed (repeatable)")
    if not metrics:
        raise ConfigError("no metrics: give --metric (repeatable), e.g. --metric clip_score")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"a metric is given twice in {', '.join(metrics)}: give each once")
    settings.check()
    options = dict(metric_options or {})
    unused = sorted(set(options) - set(metrics))
    if unused:
        raise ConfigError(f"options are given for {', '.join(unused)}, which is not among the metrics "
                          f"({', '.join(metrics)}): add it with --metric or drop its options")
    evaluators = {m: load_evaluator(m, options.get(m), registry=registry) for m in metrics}
    for evaluator in evaluators.values():
        check_prompts(evaluator, prompts)
    subjects = resolve_subjects(registry, refs, base)
    scorers = {s.label: {m: for_subject(e, s) for m, e in evaluators.items()} for s in subjects}
    report = EvalReport(subjects, metrics, prompts, seeds, settings, {m: e.version for m, e in evaluators.items()},
                        means={}, scores={})
    for subject in subjects:
        images, sampler, made = render_subject(registry, subject, report.rows, settings)
        report.images[subject.label], report.samplers[subject.label] = images, sampler
        report.rendered += made
        report.cached += len(images) - made
        image_prompts = [p for p, _ in report.rows]
        report.scores[subject.label] = {m: check_scores(m, scorer(images, image_prompts), len(images))
                                        for m, scorer in scorers[subject.label].items()}
        report.means[subject.label] = {m: sum(v) / len(v) for m, v in report.scores[subject.label].items()}
        if progress:
            progress()
    if record:
        for subject in subjects:
            if subject.ref is None:
                continue
            record_metrics(registry, subject.ref, report.means[subject.label], evaluators=report.evaluator_versions,
                           prompts=prompts, seeds=seeds,
                           settings={"sampler": report.samplers[subject.label], "steps": settings.steps,
                                     "guidance": settings.guidance, "size": settings.size, "base": subject.base})
    return report


def image_cache_dir(home: Path) -> Path:
    return cache_dir(home) / "eval-images"


def render_subject(registry, subject: Subject, rows: list[tuple[str, int]], settings: EvalSettings):
    """(images in `rows` order, the base's scheduler name, how many were rendered now): cached images are
    read back, the rest rendered in one pipeline and cached."""
    from PIL import Image

    from loraforge.models.pipeline import default_dtype, pick_device
    from loraforge.registry.resolve import resolve_base

    base = resolve_base(registry, subject.base)
    device = pick_device(None)
    identity = {"base": base.digest, "adapters": [m.digest for m in _adapter_manifests(registry, subject)],
                "steps": settings.steps, "guidance": settings.guidance, "size": settings.size,
                "device": device.type, "dtype": str(default_dtype(device))}
    folder = image_cache_dir(registry.home)
    paths = [folder / key[:2] / f"{key}.png"
             for key in (sha256_json({**identity, "prompt": p, "seed": s}) for p, s in rows)]
    images: list = [None] * len(rows)
    for i, path in enumerate(paths):
        if path.is_file():
            with Image.open(path) as im:
                images[i] = im.convert("RGB")
    missing = [i for i, im in enumerate(images) if im is None]
    if missing:
        from loraforge.home import tmp_dir
        from loraforge.models.pipeline import generate
        from loraforge.render.adapters import load_pipeline_with_adapters

        pipe, _base, _loaded = load_pipeline_with_adapters(registry, subject.base, list(subject.adapters),
                                                           device=device)
        for i in missing:
            prompt, seed = rows[i]
            image = generate(pipe, prompt, seed=seed, steps=settings.steps, guidance=settings.guidance,
                             height=settings.size, width=settings.size)
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            staging = tmp_dir(registry.home) / f"eval-{paths[i].name}"
            image.save(staging, format="PNG")
            os.replace(staging, paths[i])  # a killed run leaves no half-written image in the cache
            images[i] = image.convert("RGB")
    return images, _sampler(base), len(missing)


def _adapter_manifests(registry, subject: Subject) -> list:
    if subject.manifest is not None and subject.adapters == (subject.ref,):
        return [subject.manifest]
    return [registry.resolve(ref) for ref in subject.adapters]


def _sampler(base) -> str:
    """The scheduler class a base's pipeline samples with (from its diffusers folder), else "default"."""
    config = Path(base.path) / "scheduler" / "scheduler_config.json"
    try:
        return str(json.loads(config.read_text()).get("_class_name") or "default")
    except (OSError, ValueError):
        return "default"


def read_prompt_file(path: Path) -> list[str]:
    """Prompts of a text file, one a line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts: write one prompt a line")
    return prompts
