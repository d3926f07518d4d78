"""`loraforge hub …`: push registry versions to the Hugging Face Hub, pull repos back, list versions."""

from __future__ import annotations

import click

from loraforge.cli.output import echo_json, human_size, print_table, registry_from_ctx


@click.group()
def hub() -> None:
    """Push artifacts to and pull them from the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    import sys

    if not sys.stderr.isatty():  # huggingface_hub's own bars would litter logs and piped output
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@hub.command("push")
@click.argument("ref")
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub model repo (created when missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--branch", metavar="B", help="Commit to this branch (default main; created when missing).")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "kohya", "both"]), default="diffusers",
              show_default=True, help="Adapter weights to publish: diffusers, a kohya/A1111 copy, or both.")
@click.option("--license", "license_", metavar="ID", help="License id for the model card (e.g. openrail++).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def push(ctx, ref, repo, private, branch, fmt, license_, as_json):
    """Push registry artifact REF to the Hub as one commit tagged v<version>."""
    from loraforge.hub.push import push_artifact

    result = push_artifact(registry_from_ctx(ctx), ref, repo, private=private, branch=branch, fmt=fmt,
                           license=license_)
    if as_json:
        echo_json(result.to_dict())
    elif result.unchanged:
        click.echo(f"{repo} already has {result.ref} as {result.tag} ({result.commit[:12]}): nothing uploaded")
    else:
        click.echo(f"pushed {result.ref} to {repo}@{result.commit[:12]} (tag {result.tag}, branch {result.branch}): "
                   f"{len(result.uploaded_files)} file(s), {human_size(result.uploaded_bytes)} uploaded")


@hub.command("pull")
@click.argument("target", metavar="ORG/NAME[@REV]")
@click.option("--name", help="Registry name (default: the pushed artifact's name, or the repo name).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def pull(ctx, target, name, as_json):
    """Pull a Hub repo at REV (tag, branch or commit sha; default main) into the registry."""
    from loraforge.hub.pull import parse_hub_ref, pull_repo

    repo, revision = parse_hub_ref(target)
    manifest = pull_repo(registry_from_ctx(ctx), repo, revision, name=name)
    if as_json:
        echo_json(manifest.model_dump())
    else:
        click.echo(f"{manifest.ref} ({manifest.kind}, sha256:{manifest.digest[:12]}) from {manifest.provenance.source}")


@hub.command("ls")
@click.argument("repo", metavar="ORG/NAME")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls(ctx, repo, as_json):
    """List the versions (v<N> tags) of a Hub repo next to the local ones."""
    from loraforge.hub.ls import hub_versions

    rows = hub_versions(registry_from_ctx(ctx), repo)
    if as_json:
        echo_json(rows)
        return
    print_table([(r["version"], r["hub_tag"] or "-", (r["hub_commit"] or "-")[:12], r["local"] or "-",
                  ", ".join(r["pulled_as"]) or "-") for r in rows],
                ["version", "hub tag", "commit", "local", "pulled as"], title=f"{repo}")
