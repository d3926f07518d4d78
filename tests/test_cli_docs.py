"""Every command has --help, and docs/cli.md is generated from exactly those help texts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from loraforge.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
cli_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_docs)

ALL = [path for path, _cmd in cli_docs.iter_commands(cli, click.Context(cli, info_name="loraforge"), [])]


def test_every_listed_group_exists():
    missing = [name for name in COMMANDS if cli.get_command(click.Context(cli), name) is None]
    assert not missing, f"commands listed in COMMANDS without a module: {missing}"


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) for p in ALL])
def test_help(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    first_help_line = result.output.split("\n\n")[1].strip()
    assert first_help_line, f"loraforge {' '.join(path)} has no help text"


def test_docs_are_current():
    # A fresh interpreter: test modules register fake plugins that must not count as commands.
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_links_the_reference():
    assert "docs/cli.md" in (ROOT / "README.md").read_text()
