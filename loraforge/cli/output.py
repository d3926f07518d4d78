"""Printing for the CLI: tables (rich on a terminal, plain text otherwise), JSON, progress bars."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from itertools import islice
from json.encoder import encode_basestring_ascii
from typing import Any, Iterable, Iterator, Sequence

import click

# Rows written per write() when output streams: few calls, bounded memory.
CHUNK_ROWS = 500


def is_terminal() -> bool:
    return sys.stdout.isatty()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def echo_json_array(items: Iterable[dict]) -> None:
    """`echo_json(list(items))`, byte for byte, written a chunk of items at a time (the list is never built)."""
    chunk: list[str] = []
    first = True
    for item in items:
        chunk.append(("[\n" if first else ",\n") + _array_item(item))
        first = False
        if len(chunk) >= CHUNK_ROWS:
            click.echo("".join(chunk), nl=False)
            chunk.clear()
    click.echo("".join(chunk) + ("[]" if first else "\n]"))


def _json_float(value: float) -> str:
    return json.dumps(value)


# What json.dumps writes for each scalar type (bool before int: it is one).
_SCALARS = {str: encode_basestring_ascii, int: int.__repr__, float: _json_float, bool: json.dumps,
            type(None): json.dumps}
# An item's line layout for one order of keys: (sorted keys, %-template).
_LAYOUTS: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {}


def _array_item(item: dict) -> str:
    """One dict as `json.dumps([item], indent=2, sort_keys=True)` writes it inside the array (indented by 2).

    Dicts of scalars and lists of scalars (such as listing rows) are written from a template per key
    set, several times faster than json's pure-Python indenting encoder; anything else goes through
    json.dumps.
    """
    if type(item) is not dict:
        return _indented(item)
    layout = _LAYOUTS.get(tuple(item))
    if layout is None:
        if not item or not all(type(k) is str for k in item):
            return _indented(item)
        keys = tuple(sorted(item))
        body = ",\n".join("    " + encode_basestring_ascii(k).replace("%", "%%") + ": %s" for k in keys)
        layout = _LAYOUTS.setdefault(tuple(item), (keys, "  {\n" + body + "\n  }"))
    keys, template = layout
    values = []
    for key in keys:
        value = item[key]
        encode = _SCALARS.get(type(value))
        if encode is not None:
            values.append(encode(value))
        elif type(value) is list and all(type(v) in _SCALARS for v in value):
            values.append("[\n" + ",\n".join("      " + _SCALARS[type(v)](v) for v in value) + "\n    ]"
                          if value else "[]")
        else:
            return _indented(item)
    return template % tuple(values)


def _indented(item: Any) -> str:
    return "\n".join("  " + line for line in json.dumps(item, indent=2, sort_keys=True, default=str).split("\n"))


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str], title: str | None = None,
                page: int = 1000) -> None:
    """A table: rich on a terminal, plain aligned text otherwise.

    Rows may be an iterator. More rows than `page` stream as plain text, a chunk at a time, in columns
    as wide as the first `page` rows need (a longer cell further down pushes its line's next cells right).
    """
    rows = iter(rows)
    first = [_cells(row) for row in islice(rows, page)]
    rest = next(rows, _END)
    if rest is _END and is_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h)
        for row in first:
            table.add_row(*row)
        Console().print(table)
        return
    cells = [[str(h) for h in headers]] + first
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    if title:
        click.echo(title)
    if rest is _END:
        click.echo("\n".join(line(r) for r in cells))
        return
    click.echo("\n".join(line(r) for r in cells + [_cells(rest)]))
    while chunk := [line(_cells(row)) for row in islice(rows, CHUNK_ROWS)]:
        click.echo("\n".join(chunk))


_END = object()


def _cells(row: Sequence[Any]) -> list[str]:
    return ["" if v is None else str(v) for v in row]


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

    return Registry(_home(ctx))


def catalog_from_ctx(ctx: click.Context):
    """The home's catalog alone (no blob store, no pydantic): what the registry's read commands need."""
    from loraforge.home import loraforge_home
    from loraforge.registry.catalog import open_catalog

    return open_catalog(loraforge_home(_home(ctx)))


def _home(ctx: click.Context):
    return (ctx.find_root().obj or {}).get("home")
