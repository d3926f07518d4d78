"""`loraforge eval`: score artifacts on the same prompts and seeds, record their metrics, print the table."""

from __future__ import annotations

from pathlib import Path

import click

from loraforge.cli.output import echo_json, print_table, progress, registry_from_ctx


def _metric_options(values: tuple[str, ...]) -> dict[str, dict]:
    """`METRIC.KEY=VALUE` options, the value read as YAML (numbers, true/false, strings)."""
    import yaml

    out: dict[str, dict] = {}
    for text in values:
        left, sep, raw = text.partition("=")
        metric, dot, key = left.rpartition(".")
        if not sep or not dot or not metric or not key:
            raise click.BadParameter(f"{text!r}: write METRIC.KEY=VALUE, e.g. clip_score.model=./clip",
                                     param_hint="--metric-option")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        out.setdefault(metric, {})[key] = value
    return out


@click.command("eval")
@click.argument("refs", nargs=-1, required=True)
@click.option("--prompt", "prompts", multiple=True, help="A prompt every artifact is rendered on; repeatable.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A text file of prompts, one a line (# starts a comment); with or instead of --prompt.")
@click.option("--seed", "seeds", type=int, multiple=True, help="A seed; repeatable (default: 0). Every prompt is "
                                                               "rendered with every seed.")
@click.option("--metric", "metrics", multiple=True, required=True, metavar="NAME",
              help="Evaluator to score with; repeatable: clip_score, image_similarity, shapes, another installed "
                   "evaluator (`loraforge plugins`), or python:module:function (a function (images, prompts) -> "
                   "list of floats).")
@click.option("--metric-option", "metric_options", multiple=True, metavar="METRIC.KEY=VALUE",
              help="An option of one metric; repeatable, e.g. clip_score.model=DIR (a CLIP model folder), "
                   "image_similarity.reference=DATASET_REF|FOLDER (default: the artifact's training dataset), "
                   "image_similarity.features=pixels, shapes.aliases='{sks: star}'.")
@click.option("--steps", type=int, default=20, show_default=True, help="Denoising steps per image.")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--size", type=int, help="Image height and width in pixels, a multiple of 8 (default: the model's).")
@click.option("--base", help="Base model every adapter is rendered on, and what `base` in REFS means "
                             "(default: each adapter's own base).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as CSV.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a bar chart PNG: one panel per metric, one labelled bar per artifact.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an image grid PNG: one row per prompt (and seed), one column per artifact.")
@click.option("--no-record", is_flag=True, help="Score only; do not store the metrics in the registry.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (means and every image's score) as JSON.")
@click.pass_context
def eval_(ctx, refs, prompts, prompt_file, seeds, metrics, metric_options, steps, guidance, size, base, csv_path,
          chart, grid, no_record, as_json):
    """Render each of REFS on the same prompts and seeds, score the images with each --metric and print the
    mean of every metric per artifact.

    A REF is a registry artifact (a LoRA or slider is rendered on its manifest's base, or --base; a checkpoint
    is the model itself), `base` (the base with no adapter) or builtin:NAME. Images are cached under the
    home, keyed by the artifact's digest, prompt, seed and sampler settings: scoring again renders nothing.
    Each artifact's means are stored as its metrics (with the evaluator versions, prompts, seeds and
    settings), which `registry show` prints and publish gates read.
    """
    from loraforge.evaluators.evaluate import EvalSettings, evaluate, read_prompt_file
    from loraforge.render.generate import check_generation

    check_generation(steps, size, steps_name="--steps", size_name="--size")  # before any model loads
    all_prompts = list(prompts) + (read_prompt_file(prompt_file) if prompt_file else [])
    if not all_prompts:
        raise click.UsageError("give --prompt (repeatable) or --prompt-file")
    options = _metric_options(metric_options)
    with progress("evaluating", len(refs)) as advance:
        report = evaluate(registry_from_ctx(ctx), list(refs), prompts=all_prompts, seeds=list(seeds) or [0],
                          metrics=list(metrics), settings=EvalSettings(steps=steps, guidance=guidance, size=size),
                          base=base, metric_options=options, record=not no_record, progress=advance)
    written = []
    if csv_path:
        _parent(csv_path).write_text(report.csv_text(), encoding="utf-8")
        written.append(csv_path)
    if chart:
        report.chart().save(_parent(chart), format="PNG")
        written.append(chart)
    if grid:
        report.grid().save(_parent(grid), format="PNG")
        written.append(grid)
    if as_json:
        echo_json({**report.to_json(), "written": [str(p) for p in written]})
        return
    headers, rows = report.table()
    print_table(([r[0], r[1], *(f"{v:.4f}" for v in r[3:])] for r in rows), [headers[0], headers[1], *headers[3:]],
                title=f"mean over {len(report.prompts)} prompt(s) x {len(report.seeds)} seed(s)")
    click.echo(f"{report.rendered} image(s) rendered, {report.cached} from the cache"
               + ("" if no_record else "; metrics recorded for " + (", ".join(s.ref for s in report.subjects if s.ref)
                                                                   or "no registry artifact")))
    for path in written:
        click.echo(f"wrote {path}")


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
