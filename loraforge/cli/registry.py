"""`loraforge registry …`: import, list, show, export, tag, lineage, rm, gc, verify."""

from __future__ import annotations

from pathlib import Path

import click

from loraforge.cli.output import echo_json, human_size, print_table, progress, registry_from_ctx

KINDS = ["lora", "slider", "checkpoint", "dataset", "image"]


@click.group()
def registry() -> None:
    """Version, inspect, export and clean the local artifact registry."""


@registry.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Artifact name; each import adds the next version.")
@click.option("--kind", type=click.Choice(KINDS[:4]), help="Artifact kind (detected when omitted).")
@click.option("--base", help="Base model to check the adapter against (builtin:tiny-sd, a path, a registry ref).")
@click.option("--concept", help="For sliders: what the slider moves.")
@click.option("--scale-range", nargs=2, type=float, help="For sliders: recommended scale range LOW HIGH.")
@click.option("--instance-prompt", help="For datasets: prompt used for images without a caption.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def import_(ctx, path, name, kind, base, concept, scale_range, instance_prompt, as_json):
    """Import an adapter, checkpoint or dataset folder as a new version of NAME."""
    from loraforge.registry.importer import import_artifact
    from loraforge.registry.manifest import SliderInfo

    slider = None
    if kind == "slider" or concept or scale_range:
        slider = SliderInfo(concept=concept, method="imported", scale_range=tuple(scale_range or (-3.0, 3.0)))
    manifest = import_artifact(registry_from_ctx(ctx), path, name, kind=kind, base=base, slider=slider,
                               instance_prompt=instance_prompt)
    if as_json:
        echo_json(manifest.model_dump())
    else:
        click.echo(f"registered {manifest.ref} ({manifest.kind}, sha256:{manifest.digest[:12]}, "
                   f"{human_size(manifest.total_size)})")


@registry.command("ls")
@click.option("--kind", type=click.Choice(KINDS), help="Only artifacts of this kind.")
@click.option("--name", help="Only versions of this name.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls(ctx, kind, name, as_json):
    """List artifact versions."""
    rows = registry_from_ctx(ctx).list(kind=kind, name=name)
    if as_json:
        echo_json(rows)
        return
    print_table(
        [(r["name"], r["version"], r["kind"], ",".join(r["aliases"]), r["digest"][:12], human_size(r["size"]),
          r["created_at"]) for r in rows],
        ["name", "version", "kind", "aliases", "digest", "size", "created"],
    )


@registry.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.pass_context
def show(ctx, ref, as_json):
    """Show the manifest of REF (name, name:3, name:alias, sha256:prefix)."""
    reg = registry_from_ctx(ctx)
    manifest = reg.resolve(ref)
    if as_json:
        echo_json(manifest.model_dump())
        return
    aliases = [a for a, v in reg.aliases(manifest.name).items() if v == manifest.version]
    lines = [
        f"{manifest.ref}  ({manifest.kind})" + (f"  aliases: {', '.join(aliases)}" if aliases else ""),
        f"digest:   sha256:{manifest.digest}",
        f"created:  {manifest.provenance.created_at} on {manifest.provenance.host}",
    ]
    if manifest.base:
        lines.append(f"base:     {manifest.base.ref} ({manifest.base.family or '?'}, "
                     f"{(manifest.base.digest or '?')[:12]})")
    if manifest.adapter:
        a = manifest.adapter
        lines.append(f"adapter:  rank {a.rank}, alpha {a.alpha if a.alpha is not None else 'per-module'}, "
                     f"{a.num_modules} modules on {', '.join(a.components)}; targets {', '.join(a.target_modules)}")
    if manifest.slider:
        s = manifest.slider
        lines.append(f"slider:   concept {s.concept!r}, scales {s.scale_range[0]} … {s.scale_range[1]}, "
                     f"+ {s.positive!r} / − {s.negative!r}")
    if manifest.dataset:
        lines.append(f"dataset:  {manifest.dataset.num_images} images")
    p = manifest.provenance
    lines.append(f"made by:  {p.method or '?'}" + (f" from {p.source}" if p.source and p.source != p.method else ""))
    for parent in p.parents:
        weight = f" weight {parent.weight}" if parent.weight is not None else ""
        lines.append(f"  {parent.role}: {parent.ref}{weight}")
    if p.recipe:
        lines.append(f"recipe:   {p.recipe.name or p.recipe.path} step {p.recipe.step} "
                     f"(input {p.recipe.input_digest[:12]})")
    if manifest.metrics:
        lines.append("metrics:  " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.metrics.items())
                                              if not isinstance(v, (list, dict))))
    lines.append("files:")
    lines += [f"  {f.path}  {human_size(f.size)}  {f.sha256[:12]}" for f in manifest.files]
    click.echo("\n".join(lines))


@registry.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "peft", "kohya", "loraforge", "native"]),
              default="diffusers", show_default=True, help="Adapter format (checkpoints/datasets: native).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="New file or folder to write (never overwritten). diffusers: a path without .safetensors "
                   "becomes a folder with pytorch_lora_weights.safetensors; kohya/loraforge: .safetensors is "
                   "added when missing; peft: a folder.")
@click.pass_context
def export(ctx, ref, fmt, output):
    """Export REF to a new file or folder in the chosen format; prints the files written."""
    from loraforge.registry.exporter import export_artifact

    written = export_artifact(registry_from_ctx(ctx), ref, fmt, output)
    for path in written:
        click.echo(str(path))


@registry.command()
@click.argument("ref")
@click.argument("alias")
@click.pass_context
def tag(ctx, ref, alias):
    """Point ALIAS (such as prod) of REF's name at REF; aliases move."""
    manifest = registry_from_ctx(ctx).tag(ref, alias)
    click.echo(f"{manifest.name}:{alias} -> {manifest.ref}")


def _print_tree(node, prefix: str = "", last: bool = True, root: bool = True, shown: set | None = None) -> None:
    """Print a lineage tree; a subtree already printed is shown once and then referred to with '…'."""
    shown = set() if shown is None else shown
    weight = f" ×{node.weight:g}" if node.weight is not None else ""
    role = "" if root else f"[{node.role}] "
    connector = "" if root else ("└── " if last else "├── ")
    repeated = node.children and node.ref in shown
    click.echo(f"{prefix}{connector}{role}{node.ref} ({node.kind}){weight}" + (" …" if repeated else ""))
    if repeated:
        return
    shown.add(node.ref)
    child_prefix = prefix + ("" if root else ("    " if last else "│   "))
    for i, child in enumerate(node.children):
        _print_tree(child, child_prefix, i == len(node.children) - 1, root=False, shown=shown)


@registry.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable tree.")
@click.pass_context
def lineage(ctx, ref, as_json):
    """Show the tree of parents of REF down to bases and datasets."""
    tree = registry_from_ctx(ctx).lineage(ref)
    if as_json:
        echo_json(tree.to_dict())
    else:
        _print_tree(tree)


@registry.command()
@click.argument("ref")
@click.pass_context
def rm(ctx, ref):
    """Remove one version of an artifact; its blobs are deleted by `gc`."""
    manifest = registry_from_ctx(ctx).remove(ref)
    click.echo(f"removed {manifest.ref}")


@registry.command()
@click.pass_context
def gc(ctx):
    """Delete unreferenced blobs and temp files of dead processes.

    Waits for registrations in progress; temp folders of live processes are kept. Reports what was freed.
    """
    report = registry_from_ctx(ctx).gc()
    entries = "entry" if report.temp_entries == 1 else "entries"
    click.echo(f"deleted {report.blobs} blobs, freed {human_size(report.blob_bytes)} ({report.blob_bytes} bytes); "
               f"removed {report.temp_entries} stale temp {entries} ({human_size(report.temp_bytes)})")


@registry.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.pass_context
def verify(ctx, as_json):
    """Re-hash every blob and check every catalog row; exits non-zero on damage."""
    from loraforge.errors import CatalogError
    from loraforge.registry.registry import VerifyReport

    try:
        reg = registry_from_ctx(ctx)
    except CatalogError as exc:  # a catalog that does not open is damage to report, not a crash
        report = VerifyReport(problems=[str(exc)])
    else:
        total = reg.referenced_blob_count()
        with progress("verifying blobs", total) as advance:
            report = reg.verify(progress=advance)
    if as_json:
        echo_json({"ok": report.ok, "artifacts": report.checked_artifacts, "blobs": report.checked_blobs,
                   "problems": report.problems})
    else:
        for problem in report.problems:
            click.echo(f"DAMAGED {problem}")
        click.echo(f"checked {report.checked_artifacts} artifacts and {report.checked_blobs} blobs: "
                   + ("ok" if report.ok else f"{len(report.problems)} problems"))
    if not report.ok:
        ctx.exit(1)
