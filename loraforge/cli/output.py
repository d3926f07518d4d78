"""Printing for the CLI: tables (rich on a terminal, plain text otherwise), JSON, progress bars."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import click


def is_terminal() -> bool:
    return sys.stdout.isatty()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str | None = None) -> None:
    if is_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h)
        for row in rows:
            table.add_row(*["" if v is None else str(v) for v in row])
        Console().print(table)
        return
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if title:
        click.echo(title)
    click.echo("\n".join(lines))


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator:
    """A callable advancing a progress bar on a terminal; a no-op elsewhere."""
    if not sys.stderr.isatty():
        yield lambda n=1, **kw: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, **fields) -> None:
            bar.update(task, advance=n, **({"description": f"{description} {fields}"} if fields else {}))

        yield advance


def registry_from_ctx(ctx: click.Context):
    from loraforge.registry import Registry

    home = (ctx.find_root().obj or {}).get("home")
    return Registry(home)
