"""`loraforge registry …`: import, list, show, export, tag, lineage, rm, gc, verify."""

from __future__ import annotations

from pathlib import Path

import click

from loraforge.cli.output import (
    catalog_from_ctx, echo_json, echo_json_array, human_size, print_table, progress, registry_from_ctx,
)
from loraforge.registry.consumers import CONSUMERS, consumers_help

KINDS = ["lora", "slider", "embedding", "checkpoint", "dataset", "image", "report"]
IMPORT_KINDS = ["lora", "slider", "embedding", "checkpoint", "dataset"]

VALIDATION_GRID = "validation.png"  # the grid a training run renders and stores with its artifact

# `ls`, `show`, `lineage` and `tag` read the catalog through loraforge.registry.rows (plain sqlite3 and
# the stored manifest JSON): they start without pydantic or sqlite-utils.


@click.group()
def registry() -> None:
    """Version, inspect, export and clean the local artifact registry."""


@registry.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Artifact name; each import adds the next version.")
@click.option("--kind", type=click.Choice(IMPORT_KINDS), help="Artifact kind (detected when omitted).")
@click.option("--base", help="Base model to check the adapter against (builtin:tiny-sd, a path, a registry ref).")
@click.option("--concept", help="For sliders: what the slider moves.")
@click.option("--scale-range", nargs=2, type=float, help="For sliders: recommended scale range LOW HIGH.")
@click.option("--instance-prompt", help="For datasets: prompt used for images without a caption.")
@click.option("--token", help="For embeddings: the token to write in prompts, e.g. '<sks>' (default: the file's own "
                              "name where it has one, as A1111 .pt files do, else the file name without suffix).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def import_(ctx, path, name, kind, base, concept, scale_range, instance_prompt, token, as_json):
    """Import an adapter, embedding, checkpoint or dataset folder as a new version of NAME.

    Textual-inversion embeddings (diffusers learned_embeds, A1111 .pt/.safetensors, SDXL clip_l/clip_g)
    are recognised by their keys; with --base, one whose token the base's tokenizer already has is refused.
    """
    from loraforge.registry.importer import import_artifact
    from loraforge.registry.manifest import SliderInfo

    slider = None
    if kind == "slider" or concept or scale_range:
        slider = SliderInfo(concept=concept, method="imported", scale_range=tuple(scale_range or (-3.0, 3.0)))
    manifest = import_artifact(registry_from_ctx(ctx), path, name, kind=kind, base=base, slider=slider,
                               instance_prompt=instance_prompt, token=token)
    if as_json:
        echo_json(manifest.model_dump())
    else:
        click.echo(f"registered {manifest.ref} ({manifest.kind}, sha256:{manifest.digest[:12]}, "
                   f"{human_size(manifest.total_size)})")


@registry.command("ls")
@click.option("--kind", type=click.Choice(KINDS), help="Only artifacts of this kind.")
@click.option("--name", help="Only versions of this name; a glob such as 'style-*' matches several names.")
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="List at most N versions.")
@click.option("--offset", type=click.IntRange(min=0), default=0, metavar="N", help="Skip the first N versions.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON array).")
@click.pass_context
def ls(ctx, kind, name, limit, offset, as_json):
    """List artifact versions, ordered by name and version.

    Output streams, so a registry of any size lists in constant memory. Page with --limit and
    --offset: --limit 50 --offset 100 is the third page of 50.
    """
    from loraforge.registry.rows import list_rows

    rows = list_rows(catalog_from_ctx(ctx), kind=kind, name=name, limit=limit, offset=offset)
    if as_json:
        echo_json_array(rows)
        return
    print_table(
        ((r["name"], r["version"], r["kind"], ",".join(r["aliases"]), r["digest"][:12], human_size(r["size"]),
          r["created_at"]) for r in rows),
        ["name", "version", "kind", "aliases", "digest", "size", "created"],
    )


@registry.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--validation-grid", "validation_grid", type=click.Path(dir_okay=False, path_type=Path),
              metavar="OUT.png", help="Also write the artifact's validation grid (the validation.png a training "
                                      "run stores with what it trained) to OUT.png.")
@click.pass_context
def show(ctx, ref, as_json, validation_grid):
    """Show the manifest of REF (name, name:3, name:alias, sha256:prefix)."""
    from loraforge.registry.evaluations import metrics_of
    from loraforge.registry.rows import aliases, resolve

    catalog = catalog_from_ctx(ctx)
    row = resolve(catalog, ref)
    manifest = row.manifest()
    if validation_grid is not None:
        _write_validation_grid(ctx, row.ref, manifest, validation_grid)
        click.echo(f"validation grid: wrote {validation_grid}", err=as_json)
    evaluations = metrics_of(catalog, row.ref)
    if as_json:
        echo_json({**manifest, "evaluations": evaluations} if evaluations else manifest)
        return
    click.echo("\n".join(_manifest_lines(manifest, [a for a, v in aliases(catalog, row.name).items()
                                                     if v == row.version])))
    if evaluations:
        click.echo("evaluations (latest of each metric):")
        for metric, e in evaluations.items():
            settings = e["settings"]
            click.echo(f"  {metric} = {e['value']:.4f}  (evaluator {e['evaluator_version']}; "
                       f"{len(e['prompts'])} prompt(s) x {len(e['seeds'])} seed(s), {settings.get('steps')} steps, "
                       f"guidance {settings.get('guidance')}; {e['created_at']})")


def _write_validation_grid(ctx, ref: str, manifest: dict, output: Path) -> None:
    """Copy the artifact's validation.png out of the blob store, checked against its recorded digest."""
    import shutil

    from loraforge.errors import ConfigError, IntegrityError
    from loraforge.hashing import sha256_file

    entry = next((f for f in manifest["files"] if f["path"] == VALIDATION_GRID), None)
    if entry is None:
        raise ConfigError(f"{ref} ({manifest['kind']}) has no {VALIDATION_GRID}: only artifacts a training run made "
                          "carry one (`loraforge registry show` lists an artifact's files)")
    blob = registry_from_ctx(ctx).blobs.path(entry["sha256"])
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blob, output)
    if sha256_file(output) != entry["sha256"]:
        output.unlink()
        raise IntegrityError(f"the stored {VALIDATION_GRID} of {ref} does not match its digest "
                             f"{entry['sha256'][:12]}: run `loraforge registry verify`")


def _manifest_lines(m: dict, aliases: list[str]) -> list[str]:
    """`registry show`'s text for a stored manifest dict."""
    p = m["provenance"]
    lines = [
        f"{m['name']}:{m['version']}  ({m['kind']})" + (f"  aliases: {', '.join(aliases)}" if aliases else ""),
        f"digest:   sha256:{m['digest']}",
        f"created:  {p['created_at']} on {p['host']}",
    ]
    if m.get("base"):
        b = m["base"]
        from loraforge.families import describe

        family = describe(b["family"]) if b.get("family") else "?"
        lines.append(f"base:     {b['ref']} ({family}, {(b.get('digest') or '?')[:12]})")
    if m.get("adapter"):
        a = m["adapter"]
        lines.append(f"adapter:  rank {a.get('rank')}, alpha {a['alpha'] if a.get('alpha') is not None else 'per-module'}, "
                     f"{a.get('num_modules', 0)} modules on {', '.join(a.get('components', []))}; "
                     f"targets {', '.join(a.get('target_modules', []))}")
    if m.get("slider"):
        s = m["slider"]
        low, high = s.get("scale_range", (-3.0, 3.0))
        lines.append(f"slider:   concept {s.get('concept')!r}, scales {low} … {high}, "
                     f"+ {s.get('positive')!r} / − {s.get('negative')!r}")
    if m.get("embedding"):
        e = m["embedding"]
        lines.append(f"embedding: token {e['token']} ({e.get('num_vectors', 1)} vectors on "
                     f"{', '.join(e.get('components', []))}" + (f", from {e['initializer']!r}" if e.get("initializer") else "")
                     + "); write the token in the prompt")
    if m.get("dataset"):
        lines.append(f"dataset:  {m['dataset'].get('num_images', 0)} images")
    method, source = p.get("method"), p.get("source")
    lines.append(f"made by:  {method or '?'}" + (f" from {source}" if source and source != method else ""))
    for parent in p.get("parents", []):
        weight = f" weight {parent['weight']}" if parent.get("weight") is not None else ""
        lines.append(f"  {parent.get('role', 'input')}: {parent['ref']}{weight}")
    if p.get("recipe"):
        r = p["recipe"]
        lines.append(f"recipe:   {r.get('name') or r.get('path')} step {r['step']} (input {r['input_digest'][:12]})")
    if m.get("metrics"):
        lines.append("metrics:  " + ", ".join(f"{k}={v}" for k, v in sorted(m["metrics"].items())
                                              if not isinstance(v, (list, dict))))
    lines.append("files:")
    lines += [f"  {f['path']}  {human_size(f['size'])}  {f['sha256'][:12]}" for f in m["files"]]
    return lines


@registry.command()
@click.argument("ref")
@click.option("--for", "consumer", type=click.Choice(list(CONSUMERS)), help=consumers_help())
@click.option("--format", "fmt", type=click.Choice(["diffusers", "peft", "kohya", "bfl", "loraforge", "a1111", "native",
                                                    "single-file"]),
              help="File format, when not picked by --for; adapters default to diffusers (Flux adapters also: bfl, "
                   "ComfyUI's native diffusion_model.… names; checkpoints and "
                   "datasets: native, as stored; a checkpoint is converted to single-file or diffusers). "
                   "Embeddings: diffusers (learned_embeds) or a1111 (.pt or emb_params .safetensors; SDXL: "
                   "clip_l/clip_g in both).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="New file or folder to write (never overwritten). diffusers: a path without .safetensors "
                   "becomes a folder with pytorch_lora_weights.safetensors; kohya/loraforge: .safetensors is "
                   "added when missing; peft: a folder.")
@click.option("--kohya-names", type=click.Choice(["sgm", "diffusers"]),
              help="UNet key names of a kohya file: sgm (input_blocks_…, what kohya writes for SDXL) or "
                   "diffusers (down_blocks_…, what it writes for SD1); default: sgm for SDXL with --for "
                   "comfyui|a1111|kohya, else the names a kohya import came in (sgm for other SDXL adapters).")
@click.option("--with-manifest", is_flag=True,
              help="Write loraforge's header, with the manifest, even where the export would be the imported "
                   "file byte for byte (which has no loraforge_manifest entry).")
@click.option("--config", type=click.Path(exists=True, file_okay=False),
              help="A diffusers folder of a single-file checkpoint's architecture: the configs and tokenizers "
                   "of its --format diffusers export (default: the builtin's or diffusers' standard ones).")
@click.pass_context
def export(ctx, ref, consumer, fmt, output, kohya_names, config, with_manifest):
    """Export REF to a new file or folder for the program that will load it; prints the files written.

    ComfyUI and A1111 read kohya names (a diffusers file loads there only in part), diffusers reads
    its own keys, PEFT reads one adapter folder per model: `--for comfyui` picks the format for you.
    An imported file exported to its own format is written back byte for byte, its header included.
    """
    from loraforge.registry.exporter import export_artifact

    notes: list[str] = []
    written = export_artifact(registry_from_ctx(ctx), ref, fmt, output, consumer=consumer, kohya_names=kohya_names, config=config,
                              with_manifest=with_manifest, report=notes.append)
    for path in written:
        click.echo(str(path))
    for line in notes:
        click.echo(line, err=True)


@registry.command()
@click.argument("ref")
@click.argument("alias")
@click.pass_context
def tag(ctx, ref, alias):
    """Point ALIAS (such as prod) of REF's name at REF; aliases move."""
    from loraforge.registry.rows import tag as set_alias

    row = set_alias(catalog_from_ctx(ctx), ref, alias)
    click.echo(f"{row.name}:{alias} -> {row.ref}")


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
    from loraforge.registry.lineage import lineage as lineage_of

    tree = lineage_of(catalog_from_ctx(ctx), ref)
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
