"""`loraforge jobs …`: list, inspect, follow, cancel and retry daemon jobs."""

from __future__ import annotations

import time
from pathlib import Path

import click

from loraforge.cli.output import echo_json, print_table


def _queue(ctx: click.Context):
    from loraforge.daemon.queue import JobQueue

    return JobQueue((ctx.find_root().obj or {}).get("home"))


@click.group()
def jobs() -> None:
    """Inspect and control daemon jobs."""


@jobs.command("ls")
@click.option("--status", "state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
              help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls(ctx, state, as_json):
    """List jobs, oldest first, with the error of each failed one."""
    rows = _queue(ctx).list(status=state)
    if as_json:
        echo_json([job.to_dict() for job in rows])
        return
    print_table(
        [(j.id, j.status, j.recipe_name or Path(j.recipe).name, ",".join(j.step_ids), j.worker or "",
          j.created_at, j.error or "") for j in rows],
        ["id", "status", "recipe", "steps", "worker", "created", "error"],
    )


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show(ctx, job_id, as_json):
    """Show every field of one job."""
    job = _queue(ctx).get(job_id)
    if as_json:
        echo_json(job.to_dict())
        return
    for key, value in job.to_dict().items():
        if key == "steps":
            value = "; ".join(f"{s.get('id')} ({s.get('kind')}: {s.get('reason') or s.get('status')})"
                              for s in value) or "-"
        click.echo(f"{key + ':':18}{'' if value is None else value}")


@jobs.command("logs")
@click.argument("job_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job finishes.")
@click.pass_context
def logs(ctx, job_id, follow):
    """Print a job's log (the output of its `recipe apply`)."""
    from loraforge.daemon.queue import FINISHED_STATES

    queue = _queue(ctx)
    job = queue.get(job_id)
    path = Path(job.log_path) if job.log_path else None
    offset = 0

    def read_new() -> bool:
        nonlocal offset
        if path is None or not path.is_file():
            return False
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        if chunk:
            click.echo(chunk.decode("utf-8", "replace"), nl=False)
        return bool(chunk)

    while True:
        if read_new():
            continue
        if not follow:
            break
        if queue.get(job_id).status in FINISHED_STATES:
            read_new()  # output written between the last read and the status change
            break
        time.sleep(0.2)
    if offset == 0:
        click.echo(f"job {job_id} has no log output yet ({queue.get(job_id).status})", err=True)


@jobs.command("cancel")
@click.argument("job_id", type=int)
@click.pass_context
def cancel(ctx, job_id):
    """Cancel a queued job, or ask the daemon to stop a running one."""
    job = _queue(ctx).cancel(job_id)
    if job.status == "cancelled":
        click.echo(f"job {job_id} cancelled")
    else:
        click.echo(f"job {job_id} is running; the daemon will stop it")


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.pass_context
def retry(ctx, job_id):
    """Queue a finished job's recipe again (as a new job)."""
    new = _queue(ctx).retry(job_id)
    click.echo(f"job {new.id} queued (retry of job {job_id})")
