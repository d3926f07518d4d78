"""The CLI's error contract: Ctrl-C is one `Error: interrupted …` line saying what stayed registered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from loraforge.registry import Registry

SLOW_RENDER = f"    render: {{prompts: [a cat], seeds: {list(range(64))}, steps: 500, size: 8}}\n"  # minutes of work


def _interrupt_when(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read stdout until `marker` appears, then send SIGINT (as Ctrl-C does); return what was read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{marker!r} never appeared; output so far:\n{seen}{proc.stderr.read()}")
        seen += line
    # Well inside the step: past the imports it starts with (torch and the tokenizers load lazily, ~2-4 s on a busy
    # box; a SIGINT that lands in a finaliser of an import is swallowed by Python, as for any program).
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    return seen


@pytest.mark.parametrize("steps, registered", [
    ("  slow:\n" + SLOW_RENDER, None),
    ("  a:\n    synthetic: {kind: lora, rank: 2}\n  slow:\n" + SLOW_RENDER, "ctrlc-a:1"),
], ids=["first-step", "after-a-registered-step"])
def test_ctrl_c_is_one_line_saying_what_stays_registered(home, tmp_path, steps, registered):
    recipe = tmp_path / "ctrlc.yaml"
    recipe.write_text("steps:\n" + steps)
    env = {**os.environ, "LORAFORGE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "recipe", "apply", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _interrupt_when(proc, "slow (render): running")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted"), err
    refs = [f"{m.name}:{m.version}" for m in Registry(home).iter_manifests()]
    if registered is None:
        assert "nothing was registered" in lines[0]
        assert refs == []
    else:
        assert f"registered before it stays: {registered}" in lines[0]
        assert refs == [registered]
