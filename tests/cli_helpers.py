"""Running the CLI in-process against a given loraforge home."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from loraforge.cli import cli


def run_cli(home: Path, *args: str, ok: bool = True) -> Result:
    """`loraforge --home HOME ARGS…`; with `ok`, asserts exit code 0 and shows the output if not."""
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result
