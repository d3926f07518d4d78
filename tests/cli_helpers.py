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


def error_line(output: str) -> str:
    """The one line of a refusal: `Error: …` and nothing else (no traceback, no second line)."""
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def refused(result: Result, exit_code: int = 1) -> str:
    """The `Error: …` line of a CLI run that must fail with `exit_code`."""
    assert result.exit_code == exit_code, result.output
    return error_line(result.output)


def link_builtins(home: Path, folders: dict[str, Path]) -> Path:
    """`home` with the given builtin model folders ({name: built folder}) linked in, as a fresh home sees them.

    The links point at shared folders: a test must not write into `home/models/builtin/*`."""
    from loraforge.home import models_dir

    builtin = models_dir(home) / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    for name, built in folders.items():
        (builtin / name).symlink_to(built, target_is_directory=True)
    return home
