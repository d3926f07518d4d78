"""`loraforge lora fuse|extract|resize`: thin wrappers over `loraforge.ops`."""

from __future__ import annotations

import click

from loraforge.cli.output import progress, registry_from_ctx


def _rule(energy: float | None, ratio: float | None) -> tuple[str, float | None]:
    if energy is not None and ratio is not None:
        raise click.UsageError("give --energy or --ratio, not both")
    if energy is not None:
        return "sv_fro", energy
    if ratio is not None:
        return "sv_ratio", ratio
    return "fixed", None


@click.group()
def lora() -> None:
    """Fuse, extract and resize LoRA adapters."""


@lora.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--dtype", default="fp16", show_default=True, help="Output dtype: fp32, fp16 or bf16.")
@click.option("-o", "--output", type=click.Path(),
              help="Write the fused checkpoint here without registering: a diffusers folder for a folder BASE, "
                   "a single file in BASE's own layout for a single-file BASE.")
@click.option("--name", help="Register the fused checkpoint under this name.")
@click.option("--config", type=click.Path(exists=True, file_okay=False),
              help="A diffusers folder of a single-file BASE's architecture (its configs map the file's tensors; "
                   "not taken for a Black Forest Labs Flux file, named by its own header).")
@click.pass_context
def fuse(ctx, base, adapters, dtype, output, name, config):
    """Bake ADAPTERS (REF=W) into checkpoint BASE (a diffusers folder, .safetensors single file or .ckpt).

    A Black Forest Labs Flux file (flux1-dev.safetensors) holds the transformer alone: adapters changing a text
    encoder are fused into a diffusers Flux folder instead.
    """
    from loraforge.ops.fuse import fuse_loras
    from loraforge.ops.specs import AdapterInput, FuseSpec, make_spec
    from loraforge.registry.refs import parse_weighted

    if not name and not output:
        raise click.UsageError("give --name NAME to register the result or -o PATH to write it")
    items = [make_spec(AdapterInput, ref=r, weight=w) for r, w in (parse_weighted(a) for a in adapters)]
    spec = make_spec(FuseSpec, base=base, adapters=items, dtype=dtype)
    with progress("fusing") as advance:
        result = fuse_loras(registry_from_ctx(ctx), spec, name=name, output=output, progress=advance, config=config)
    click.echo(f"registered {result.ref} (checkpoint, fused {len(items)} adapter(s))" if name else f"wrote {result}")


@lora.command()
@click.argument("tuned")
@click.option("--base", required=True, help="The checkpoint TUNED was fine-tuned from.")
@click.option("--rank", type=int, default=32, show_default=True, help="Rank (the cap when a rule is given).")
@click.option("--energy", type=float, help="Per-module rank keeping this fraction of ΔW's energy (sv_fro).")
@click.option("--ratio", type=float, help="Per-module rank keeping singular values ≥ σ_max / RATIO (sv_ratio).")
@click.option("--conv", is_flag=True, help="Also extract k×k convolutions.")
@click.option("--name", required=True, help="Register the adapter under this name.")
@click.option("--config", type=click.Path(exists=True, file_okay=False),
              help="A diffusers folder of the single-file inputs' architecture (its configs map their tensors; "
                   "default: the folder input's, or the builtin model's; not taken for Black Forest Labs Flux files).")
@click.pass_context
def extract(ctx, tuned, base, rank, energy, ratio, conv, name, config):
    """Extract a LoRA from checkpoint TUNED by truncated SVD of TUNED − BASE per module.

    TUNED and BASE are diffusers folders, .safetensors single files or .ckpt files, in any mix (Black Forest
    Labs Flux files give the transformer's modules in diffusers names).
    """
    from loraforge.ops.extract import extract_lora

    rule, value = _rule(energy, ratio)
    with progress("extracting") as advance:
        manifest = extract_lora(registry_from_ctx(ctx), tuned, base, name=name, rank=rank, rule=rule, value=value,
                                conv=conv, progress=advance, config=config)
    click.echo(f"registered {manifest.ref} (lora, rank ≤ {manifest.adapter.rank}, {manifest.adapter.num_modules} modules)")


@lora.command()
@click.argument("ref")
@click.option("--rank", type=int, help="New rank (the cap when a rule is given).")
@click.option("--energy", type=float, help="Keep this fraction of each module's energy, e.g. 0.95.")
@click.option("--ratio", type=float, help="Keep singular values ≥ σ_max / RATIO.")
@click.option("--name", required=True, help="Register the resized adapter under this name.")
@click.pass_context
def resize(ctx, ref, rank, energy, ratio, name):
    """Resize adapter REF to a new rank, exactly (optimal truncation, no dense matrix)."""
    from loraforge.ops.resize import resize_lora

    rule, value = _rule(energy, ratio)
    manifest = resize_lora(registry_from_ctx(ctx), ref, name=name, rank=rank, rule=rule, value=value)
    click.echo(f"registered {manifest.ref} (lora, rank {manifest.adapter.rank}{conversion_note(manifest)})")


def conversion_note(manifest) -> str:
    """`, LyCORIS modules as LoRA pairs: relative error E` when variant modules were converted, else ''."""
    error = manifest.adapter.lowrank_error if manifest.adapter is not None else None
    return "" if error is None else f", LyCORIS modules as LoRA pairs: largest relative error {error:.2e}"
