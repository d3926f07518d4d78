"""`loraforge daemon`: run the build daemon, and `daemon status` to see what it is doing."""

from __future__ import annotations

import re

import click

from loraforge.cli.output import echo_json, print_table

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Duration(click.ParamType):
    """A duration like `2s`, `500ms`, `1.5` (seconds) or `5m`, as seconds."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration: write e.g. 2s, 500ms or 5m", param, ctx)
        return float(match.group(1)) * _UNITS[match.group(2)]


def _home(ctx: click.Context):
    from loraforge.home import loraforge_home

    return loraforge_home((ctx.find_root().obj or {}).get("home"))


@click.group(invoke_without_command=True)
@click.option("--watch", "watch", multiple=True, type=click.Path(file_okay=False),
              help="Folder of recipe files (*.yaml) to watch; repeat for several.")
@click.option("--gpus", help="CUDA devices to use, one worker each, e.g. 0,1 (default: every visible GPU).")
@click.option("--cpu", is_flag=True, help="Run one CPU worker, even when GPUs are present.")
@click.option("--no-publish", is_flag=True, help="Pass --no-publish to every `recipe apply`.")
@click.option("--debounce", type=Duration(), default="2s", show_default=True,
              help="Quiet time after a file event before a recipe is re-planned.")
@click.option("--grace", type=Duration(), default="60s", show_default=True,
              help="On SIGTERM/SIGINT, how long a running job may take to checkpoint before it is killed.")
@click.option("--recipe-cmd", metavar="COMMAND",
              help="The command jobs run as `COMMAND recipe plan|apply FILE` (default: this loraforge), "
                   "e.g. 'nice -n 10 loraforge'.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where jobs run: local = one child process per GPU of this machine; ray = one Ray task per "
                   "job on a Ray cluster (needs `pip install 'loraforge[ray]'`); the registry stays here.")
@click.option("--ray-address", default="auto", show_default=True, metavar="ADDRESS",
              help="With --executor ray: the cluster to join, `auto` (the one started on this machine with "
                   "`ray start`), host:6379 or ray://host:10001.")
@click.option("--ray-slots", type=click.IntRange(min=1), metavar="N",
              help="With --executor ray: how many jobs run at once (default: the cluster's GPUs, else its CPUs).")
@click.pass_context
def daemon(ctx, watch, gpus, cpu, no_publish, debounce, grace, recipe_cmd, executor, ray_address, ray_slots):
    """Watch recipes and the data they read; re-run stale steps as jobs, one per GPU (or on a Ray cluster).

    Stop it with SIGTERM or Ctrl-C (running jobs checkpoint first); a second signal stops at once.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not watch:
        raise click.UsageError("give at least one --watch DIR (or use `loraforge daemon status`)")
    if cpu and gpus:
        raise click.UsageError("--cpu and --gpus exclude each other")
    if executor == "ray" and (cpu or gpus):
        raise click.UsageError("--cpu and --gpus choose local workers; with --executor ray the cluster's "
                               "resources decide (see --ray-slots)")
    if executor == "local" and (ray_slots or ray_address != "auto"):
        raise click.UsageError("--ray-address and --ray-slots need --executor ray")
    import logging

    from loraforge.daemon.daemon import Daemon
    from loraforge.daemon.worker import detect_gpus

    devices = [] if cpu or executor == "ray" else ([g.strip() for g in gpus.split(",") if g.strip()] if gpus else detect_gpus())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import shlex

    runner = Daemon(watch, home=_home(ctx), gpus=devices, publish=not no_publish, debounce=debounce, grace=grace,
                    recipe_cmd=shlex.split(recipe_cmd) if recipe_cmd else None, executor=executor,
                    ray_address=ray_address, ray_slots=ray_slots)
    ctx.exit(runner.run())


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--events", default=10, show_default=True, help="How many recent events to show.")
@click.pass_context
def status(ctx, as_json, events):
    """Show whether the daemon runs, its workers, the job queue and its last events."""
    from loraforge.daemon.queue import JobQueue
    from loraforge.daemon.status import read_status

    home = _home(ctx)
    state = read_status(home)
    counts = JobQueue(home).counts()
    if as_json:
        echo_json({"running": bool(state and state["running"]), "status": state, "queue": counts})
        return
    if state is None:
        click.echo(f"daemon: never started on {home}")
    elif state["running"]:
        click.echo(f"daemon: running (pid {state['pid']}, since {state['started_at']}, "
                   f"heartbeat {state['heartbeat_age_s']:.0f}s ago{', stopping' if state.get('stopping') else ''})")
        click.echo(f"watching: {', '.join(state['watch'])}")
        print_table([(w["name"], w["gpu"] if w["gpu"] is not None else "cpu", w["job"] or "idle", w["pid"] or "")
                     for w in state["workers"]], ["worker", "device", "job", "pid"])
    else:
        click.echo(f"daemon: not running (last heartbeat {state['heartbeat']}, pid {state['pid']})")
    click.echo("queue: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if state and state.get("events") and events > 0:
        click.echo("last events:")
        for item in state["events"][-events:]:
            click.echo(f"  {item['at']}  {item['message']}")
