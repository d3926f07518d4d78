"""`loraforge recipe validate|plan|apply`: check a recipe, show what is stale and why, build it."""

from __future__ import annotations

import sys

import click

from loraforge.cli.output import echo_json, print_table, registry_from_ctx
from loraforge.errors import LoraforgeError

SET_HELP = "Override a variable of the recipe's vars: block (repeatable), e.g. --set alpha=0.3."


@click.group()
def recipe() -> None:
    """Validate, plan and apply recipe files (YAML: merges, stacks, training runs, renders, publishing)."""


def _load(path: str, sets: tuple[str, ...]):
    from loraforge.recipes.loader import parse_set
    from loraforge.recipes.schema import load_recipe

    return load_recipe(path, parse_set(sets))


@recipe.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help=SET_HELP)
@click.pass_context
def validate(ctx: click.Context, file: str, sets: tuple[str, ...]) -> None:
    """Check FILE: syntax, step kinds, methods, references, cycles and that artifacts exist."""
    from loraforge.recipes.plan import make_plan

    recipe_ = _load(file, sets)
    plan = make_plan(recipe_, registry_from_ctx(ctx))
    click.echo(f"{file}: valid recipe {recipe_.name!r} with {len(plan.steps)} steps ({' -> '.join(plan.graph.order)})")


@recipe.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help=SET_HELP)
@click.option("--locked", is_flag=True, help="Resolve references exactly as FILE.lock records them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the daemon's interface).")
@click.pass_context
def plan(ctx: click.Context, file: str, sets: tuple[str, ...], locked: bool, as_json: bool) -> None:
    """Show each step of FILE in run order: stale or up to date, and why."""
    from loraforge.recipes.plan import make_plan

    try:
        result = make_plan(_load(file, sets), registry_from_ctx(ctx), locked=locked)
    except LoraforgeError as exc:
        if not as_json:
            raise
        echo_json({"valid": False, "error": " ".join(str(exc).split())})
        sys.exit(1)
    if as_json:
        echo_json(result.to_json())
        return
    rows = [(s.id, s.kind, s.status, s.output or "-", s.existing.ref if s.existing else "-", s.reason)
            for s in result.steps]
    print_table(rows, ["step", "kind", "status", "output", "reuses", "reason"],
                title=f"{result.recipe.name}: {len(result.stale)} of {len(result.steps)} steps to run")
    for path, hashed in result.recomputed.items():
        click.echo(f"digest recomputed: {path} ({hashed} file{'s' if hashed != 1 else ''} hashed)")


@recipe.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", "force", multiple=True, metavar="STEP",
              help="Re-run STEP and the steps downstream of it even if up to date (repeatable).")
@click.option("--dry-run", is_flag=True, help="Plan and print what would run; change nothing.")
@click.option("--locked", is_flag=True, help="Use exactly the versions and digests in FILE.lock; fail if anything changed.")
@click.option("--no-publish", is_flag=True, help="Build everything but push nothing to the Hub (publish steps are skipped).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result of every step as one JSON object.")
@click.pass_context
def apply(ctx: click.Context, file: str, force: tuple[str, ...], dry_run: bool, locked: bool, no_publish: bool,
          sets: tuple[str, ...], as_json: bool) -> None:
    """Build FILE: run stale steps in dependency order, reuse the rest, write FILE.lock."""
    from loraforge.recipes.apply import apply_plan
    from loraforge.recipes.plan import make_plan

    registry = registry_from_ctx(ctx)
    plan_ = make_plan(_load(file, sets), registry, force=force, locked=locked)
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    result = apply_plan(plan_, registry, dry_run=dry_run, publish=not no_publish, echo=echo)
    if as_json:
        echo_json(result.to_json())
    elif dry_run:
        rows = [(r.id, r.action, r.ref or "-", r.message) for r in result.results]
        print_table(rows, ["step", "action", "output", "reason"], title="dry run: nothing was changed")
    else:
        built = sum(r.action == "built" for r in result.results)
        lock = result.lock or ("not written (stopped by SIGTERM)" if result.stopped else "not written (a step failed)")
        click.echo(f"{built} step(s) run, {sum(r.action == 'reused' for r in result.results)} up to date; "
                   f"lock: {lock}")
    if (ctx.obj or {}).get("debug") and result.failed and result.failed[0].error is not None:
        raise result.failed[0].error  # --debug: the traceback of the step that failed, not of this wrapper
    result.raise_for_failure()
