"""The worked examples of docs/architecture.md run as written: each plugin kind it shows plugs in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import link_builtins

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
EXAMPLE = re.compile(r"<!-- example -->\n```python\n(.*?)```", re.S)


def examples() -> list[str]:
    return EXAMPLE.findall(DOC.read_text(encoding="utf-8"))


def test_the_doc_has_an_example_for_every_plugin_kind_it_lists():
    text = "\n".join(examples())
    for group in ("MERGE_METHODS", "REWARDS", "TRAINERS", "STEP_KINDS", "register_format", "EVALUATORS"):
        assert group in text, f"docs/architecture.md has no worked example using {group}"


@pytest.mark.timeout(600)
def test_the_worked_examples_run(tmp_path, builtin_folders):
    # A fresh interpreter and home: the examples register plugins, which must not leak into other tests.
    home = link_builtins(tmp_path / "home", builtin_folders)
    blocks = examples()
    script = "\n\n".join(f"# -- example {i + 1}\n{code}\nprint('example {i + 1} ran', flush=True)"
                         for i, code in enumerate(blocks))
    env = {**os.environ, "LORAFORGE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"example {len(blocks)} ran" in result.stdout
