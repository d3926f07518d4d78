"""The `loraforge` command: a thin click layer over the library, with lazily loaded groups."""

from __future__ import annotations

import importlib
import sqlite3
import sys

import click

from loraforge import __version__
from loraforge.errors import LoraforgeError, storage_error
from loraforge.quiet import quiet_library_logs

# name → "module:attribute"; each group lives in its own module and is imported only when used,
# so `loraforge registry ls` never pays for importing torch.
COMMANDS: dict[str, str] = {
    "registry": "loraforge.cli.registry:registry",
    "generate": "loraforge.cli.generate:generate",
    "render": "loraforge.cli.render:render",
    "merge": "loraforge.cli.merge:merge",
    "lora": "loraforge.cli.lora:lora",
    "methods": "loraforge.cli.plugins:methods",
    "plugins": "loraforge.cli.plugins:plugins",
    "recipe": "loraforge.cli.recipe:recipe",
    "train": "loraforge.cli.train:train",
    "hub": "loraforge.cli.hub:hub",
    "daemon": "loraforge.cli.daemon:daemon",
    "jobs": "loraforge.cli.jobs:jobs",
    "eval": "loraforge.cli.eval:eval_",
}

COMMAND_HELP: dict[str, str] = {
    "registry": "Version, inspect, export and clean the local artifact registry.",
    "generate": "Generate one image from a base model with adapters.",
    "render": "Render prompts with several artifacts side by side in one grid.",
    "merge": "Merge checkpoints or LoRA adapters.",
    "lora": "Fuse, extract and resize LoRA adapters.",
    "methods": "List merge methods, LoRA algebra methods and trainers.",
    "plugins": "List installed plugins (merge methods, trainers, rewards, evaluators, step kinds, formats).",
    "recipe": "Validate, plan and apply recipe files.",
    "train": "Train adapters (LoRA, DreamBooth-LoRA, sliders, joint, reward).",
    "hub": "Push artifacts to and pull them from the Hugging Face Hub.",
    "daemon": "Watch recipes and datasets and rebuild what changed.",
    "jobs": "Inspect and control daemon jobs.",
    "eval": "Score artifacts on the same prompts and seeds with evaluators; record, tabulate and chart the metrics.",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMAND_HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraforgeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = " ".join(str(exc).split("\n"))
            click.echo(f"Error: {message}", err=True)
            ctx.exit(1)
        except sqlite3.DatabaseError as exc:
            # Exactly DatabaseError is SQLite's "corrupt" / "not a database" (its subclasses are other faults).
            if type(exc) is not sqlite3.DatabaseError or (ctx.obj and ctx.obj.get("debug")):
                raise
            home = (ctx.obj or {}).get("home") or "the loraforge home"
            click.echo(f"Error: the registry catalog in {home} is damaged ({exc}): restore its registry.db from "
                       "a backup (`loraforge registry verify` lists the damage)", err=True)
            ctx.exit(1)
        except OSError as exc:
            # A full disk, `ulimit -f` or a read-only mount can hit any write; say which, in one line.
            storage = storage_error(exc, (ctx.obj or {}).get("home"))
            if storage is None or (ctx.obj and ctx.obj.get("debug")):
                raise
            click.echo(f"Error: {storage}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: interrupted: {_interrupted_state()}", err=True)
            ctx.exit(130)  # 128 + SIGINT, as shells report a Ctrl-C


def _interrupted_state() -> str:
    """What an interrupted command leaves: registrations are all-or-nothing, so only whole versions."""
    registry = sys.modules.get("loraforge.registry.registry")  # not imported: nothing was registered
    refs = list(registry.registered_in_this_process) if registry else []
    if not refs:
        return "nothing was registered; run the command again to start over"
    shown = ", ".join(refs[:5]) + (f" and {len(refs) - 5} more" if len(refs) > 5 else "")
    one = len(refs) == 1
    return (f"{len(refs)} version{'' if one else 's'} registered before it {'stays' if one else 'stay'}: "
            f"{shown}; nothing half-done was registered")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loraforge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--home", envvar="LORAFORGE_HOME", type=click.Path(file_okay=False),
              help="loraforge home folder (default $LORAFORGE_HOME or ~/.loraforge).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, home: str | None) -> None:
    """loraforge: a registry, recipe engine and build daemon for LoRA adapters of diffusion models."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["home"] = home


def main() -> None:
    # Library chatter (optional backends, adapter bookkeeping) is noise for CLI users; --debug keeps it.
    if "--debug" not in sys.argv:
        quiet_library_logs()
    cli(prog_name="loraforge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
