"""`loraforge render`: a comparison grid — prompts × seeds down, one column per artifact across."""

from __future__ import annotations

from pathlib import Path

import click

from loraforge.cli.output import echo_json, progress, registry_from_ctx

COLUMN_HELP = ("One column (repeatable, in order): base (no adapter); an adapter (LoRA, DreamBooth-LoRA, slider, "
               "embedding) as REF or REF=WEIGHT; a checkpoint REF (rendered in its own pipeline); or several "
               "joined with commas, composed in one column, e.g. age=1.5,smile=-0.5 (sliders at fixed scales).")


@click.command()
@click.option("--base", required=True, help="Base model of every column without a checkpoint: builtin:tiny-sd, "
                                            "a path, a Hub id or a registry checkpoint.")
@click.option("--config", "config", metavar="DIR",
              help="Diffusers folder of the base's architecture whose configs and tokenizers a single-file base "
                   "is read with (needed offline for a single file that is not a builtin's).")
@click.option("--compare", "columns", multiple=True, required=True, metavar="COLUMN", help=COLUMN_HELP)
@click.option("--prompt", "prompts", multiple=True, required=True, help="Text prompt: one grid row each; repeatable.")
@click.option("--seed", "seeds", multiple=True, type=int, default=(0,), show_default=True,
              help="Seed: one grid row per prompt and seed, the same noise in every column; repeatable.")
@click.option("--negative-prompt", help="Negative prompt.")
@click.option("--steps", type=int, default=20, show_default=True, help="Denoising steps per image.")
@click.option("--guidance", type=float, default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--size", type=int, help="Image height and width in pixels, a multiple of 8 (default: the model's).")
@click.option("--title", help="Title written above the grid.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write the grid to.")
@click.option("--json", "as_json", is_flag=True, help="Print the file, its size and the row and column labels as JSON.")
@click.pass_context
def render(ctx, base, config, columns, prompts, seeds, negative_prompt, steps, guidance, size, title, output, as_json):
    """Render PROMPTs with each --compare column side by side in one labelled grid.

    Every cell of a row uses the same seed, so columns differ only by what they render with. A slider used
    outside the scale range its manifest records is rendered, with a warning on stderr.
    """
    from loraforge.render.compare import parse_column, render_comparison
    from loraforge.render.generate import check_generation

    check_generation(steps, size, steps_name="--steps", size_name="--size")  # before the slow model load
    parsed = [parse_column(c) for c in columns]
    with progress("rendering columns", len(parsed)) as advance:
        result = render_comparison(
            registry_from_ctx(ctx), base, parsed, list(prompts), seeds=list(seeds), steps=steps, guidance=guidance,
            size=size, negative_prompt=negative_prompt, title=title, config=config,
            warn=lambda message: click.echo(f"Warning: {message}", err=True), progress=advance,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    result.grid.save(output, format="PNG")
    if as_json:
        echo_json({"output": str(output), "size": list(result.grid.size), "rows": result.row_labels,
                   "columns": result.column_labels})
        return
    click.echo(f"wrote {output} ({result.grid.width}x{result.grid.height}; {len(result.row_labels)} rows x "
               f"{len(result.column_labels)} columns)")
