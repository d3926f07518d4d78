"""`loraforge generate`: one image from a base with adapters, for eyes."""

from __future__ import annotations

from pathlib import Path

import click

from loraforge.cli.output import registry_from_ctx


@click.command()
@click.option("--base", required=True, help="Base model: builtin:tiny-sd, a path, a Hub id or a registry checkpoint.")
@click.option("--config", "config", metavar="DIR",
              help="Diffusers folder of the base's architecture whose configs and tokenizers a single-file base "
                   "is read with (needed offline for a single file that is not a builtin's).")
@click.option("--lora", "loras", multiple=True, metavar="REF[=WEIGHT]",
              help="Adapter with an optional weight; repeatable. A textual-inversion embedding goes here too, without "
                   "a weight: write its token in --prompt.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--negative-prompt", help="Negative prompt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--guidance", type=float, default=5.0, show_default=True)
@click.option("--size", type=int, help="Image height and width in pixels, a multiple of 8 (default: the model's).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def generate(ctx, base, config, loras, prompt, negative_prompt, seed, steps, guidance, size, output):
    """Generate one image from BASE with adapters applied at their weights."""
    from loraforge.render.generate import check_generation, generate_image

    check_generation(steps, size, steps_name="--steps", size_name="--size")  # before the slow model load
    image = generate_image(
        registry_from_ctx(ctx), base, list(loras), prompt, seed=seed, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, size=size, config=config,
        warn=lambda message: click.echo(f"Warning: {message}", err=True),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    click.echo(f"wrote {output} ({image.width}x{image.height})")
