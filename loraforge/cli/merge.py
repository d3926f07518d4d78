"""`loraforge merge checkpoints|loras`: thin wrappers over `loraforge.ops`."""

from __future__ import annotations

import json

import click

from loraforge.cli.output import progress, registry_from_ctx


def _params(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs, values parsed as JSON when they can be (numbers, lists), else strings."""
    from loraforge.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid parameter {pair!r}: write KEY=VALUE, e.g. density=0.3")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _block_weights(text: str | None):
    from loraforge.errors import ConfigError

    if text is None:
        return None
    text = text.strip()
    try:
        if text.startswith("{"):
            return json.loads(text)
        if ":" in text or "=" in text:
            return {k.strip(): float(v) for k, v in (p.replace("=", ":").split(":") for p in text.split(","))}
        return [float(v) for v in text.split(",")]
    except (ValueError, TypeError):
        raise ConfigError(f"invalid block weights {text!r}: give comma-separated numbers or NAME:W pairs, "
                          "e.g. IN00:0.2,M00:0.8 (SD) or double:0.3,single.0:0.8 (Flux)") from None


@click.group()
def merge() -> None:
    """Merge checkpoints or LoRA adapters."""


@merge.command("checkpoints")
@click.argument("models", nargs=-1, required=True)
@click.option("--method", default="weighted_sum", show_default=True, help="Merge method (see `loraforge methods`).")
@click.option("--alpha", type=float, help="Interpolation / difference strength.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Method parameter, e.g. density=0.3.")
@click.option("--block-weights", help="Per-block α of the denoiser: comma-separated numbers (BASE first, optional) "
              "or NAME:W pairs. SD blocks: IN00.., M00, OUT00..; Flux: double.N, single.N, or a group (double, "
              "single) for all its blocks.")
@click.option("--include", multiple=True, help="Only merge these components (unet or transformer, text_encoder, "
              "vae; default: SD's unet and text encoders, Flux's transformer alone).")
@click.option("--exclude", multiple=True, help="Copy these components from the first model when --include is not "
              "given (default: vae; none: exclude nothing); refused together with --include.")
@click.option("--dtype", default="fp16", show_default=True, help="Output dtype: fp32, fp16 or bf16.")
@click.option("-o", "--output", type=click.Path(), help="Write the result here without registering it.")
@click.option("--name", help="Register the result under this name.")
@click.pass_context
def checkpoints(ctx, models, method, alpha, params, block_weights, include, exclude, dtype, output, name):
    """Merge checkpoints MODELS (registry refs, paths or builtin:NAME; REF=W gives a weight)."""
    from loraforge.ops.merge import merge_checkpoints
    from loraforge.ops.specs import CheckpointMergeSpec, ModelInput, make_spec
    from loraforge.registry.refs import parse_weighted

    if not name and not output:
        raise click.UsageError("give --name NAME to register the result or -o PATH to write it")
    inputs = []
    for m in models:
        ref, weight = parse_weighted(m, default=None) if "=" in m else (m, None)
        inputs.append(make_spec(ModelInput, ref=ref, weight=weight))
    fields = dict(method=method, models=inputs, alpha=alpha, params=_params(params),
                  block_weights=_block_weights(block_weights), dtype=dtype)
    if include:
        fields["include"] = list(include)
    if exclude:
        fields["exclude"] = [] if list(exclude) == ["none"] else list(exclude)
    spec = make_spec(CheckpointMergeSpec, **fields)
    registry = registry_from_ctx(ctx)
    with progress("merging") as advance:
        result = merge_checkpoints(registry, spec, name=name, output=output, progress=advance)
    if name:
        click.echo(f"registered {result.ref} (checkpoint, {spec.method}, digest {result.digest[:12]})")
        if output:
            click.echo(f"wrote {output}")
    else:
        click.echo(f"wrote {result}")


@merge.command("loras")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", default="svd", show_default=True, help="concat, svd, ties or dare.")
@click.option("--rank", type=int, help="Target rank (svd/ties/dare; default: the largest input rank).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Method parameter, e.g. density=0.3.")
@click.option("--name", required=True, help="Register the result under this name.")
@click.pass_context
def loras(ctx, adapters, method, rank, params, name):
    """Merge ADAPTERS given as REF=W (weights may be negative)."""
    from loraforge.ops.lora_merge import merge_loras
    from loraforge.ops.specs import AdapterInput, LoraMergeSpec, make_spec
    from loraforge.registry.refs import parse_weighted

    items = [make_spec(AdapterInput, ref=r, weight=w) for r, w in (parse_weighted(a) for a in adapters)]
    spec = make_spec(LoraMergeSpec, method=method, adapters=items, rank=rank, params=_params(params))
    registry = registry_from_ctx(ctx)
    with progress("merging adapters") as advance:
        manifest = merge_loras(registry, spec, name=name, progress=advance)
    from loraforge.cli.lora import conversion_note

    click.echo(f"registered {manifest.ref} (lora, {method}, rank {manifest.adapter.rank}, "
               f"{manifest.adapter.num_modules} modules{conversion_note(manifest)})")
