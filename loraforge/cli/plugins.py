"""`loraforge plugins` and `loraforge methods`: what is installed, built-in or third-party."""

from __future__ import annotations

import click

from loraforge.cli.output import echo_json, print_table
from loraforge.plugins import GROUPS


def _rows(group_names):
    rows = []
    for group in group_names:
        for info in GROUPS[group]:
            rows.append({"group": group, "name": info.name, "version": info.version, "source": info.source,
                         "reference_url": info.reference_url, "description": info.description})
    return rows


def _show(rows, as_json):
    if as_json:
        echo_json(rows)
    else:
        print_table([(r["group"], r["name"], r["version"], r["source"], r["description"], r["reference_url"] or "")
                     for r in rows], ["group", "name", "version", "source", "description", "reference"])


@click.command()
@click.option("--group", type=click.Choice(list(GROUPS)), help="Only this plugin group.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(group, as_json):
    """List installed plugins (merge methods, trainers, rewards, evaluators, recipe step kinds, adapter formats)."""
    groups = [group] if group else list(GROUPS)
    _show(_rows(groups), as_json)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json):
    """List merge methods, LoRA algebra methods and trainers."""
    _show(_rows(["merge_methods", "lora_methods", "trainers"]), as_json)
