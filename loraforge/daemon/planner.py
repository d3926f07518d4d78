"""Asks the recipe engine for a plan (`recipe plan FILE --json`) in a child process the daemon polls."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from loraforge.hashing import sha256_file


@dataclass
class PlanReport:
    """A recipe's plan as the daemon reads it from `recipe plan --json` (the engine's is recipes.plan.Plan)."""

    recipe: str
    valid: bool
    error: Optional[str] = None
    name: Optional[str] = None
    digest: Optional[str] = None
    steps: list[dict] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)  # registry versions the plan read: {"ref", "digest"}

    @property
    def stale_steps(self) -> list[dict]:
        return [s for s in self.steps if s.get("status") != "up-to-date"]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _parse_json_object(text: str) -> Optional[dict]:
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def file_digest(path: Path) -> Optional[str]:
    try:
        return sha256_file(path)
    except OSError:
        return None


class PlanningChild:
    """One `recipe plan FILE --json` child, polled rather than waited on.

    Planning can take minutes (a dataset folder is hashed, a base model resolved); the daemon polls this
    child so its heartbeat, reaping and dispatch go on meanwhile. Output goes to anonymous temp files,
    not pipes: a plan larger than a pipe buffer would otherwise stall a child nobody reads from yet.
    Any failure (bad recipe, crash, hang) becomes an invalid PlanReport, never an exception.
    """

    def __init__(self, recipe_cmd: Sequence[str], recipe: Path, env: dict[str, str], timeout: float = 300.0):
        self.recipe = Path(recipe)
        self.timeout = float(timeout)
        self.deadline = time.monotonic() + self.timeout  # real time: a test's clock must not stop a hang
        self.proc: Optional[subprocess.Popen] = None
        self.result: Optional[PlanReport] = None
        self._stdout = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        cmd = [*recipe_cmd, "recipe", "plan", str(self.recipe), "--json"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._stdout, stderr=self._stderr, text=True, env=env,
                                         stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._finish(self._invalid(f"cannot run the recipe planner: {exc}"))

    def _invalid(self, error: str) -> PlanReport:
        return PlanReport(str(self.recipe), False, error, digest=file_digest(self.recipe))

    def _finish(self, plan: PlanReport) -> PlanReport:
        self.result = plan
        self._stdout.close()
        self._stderr.close()
        return plan

    def poll(self) -> Optional[PlanReport]:
        """The plan once the child is done (killed after `timeout`), else None."""
        if self.result is not None or self.proc is None:
            return self.result
        returncode = self.proc.poll()
        if returncode is None:
            if time.monotonic() < self.deadline:
                return None
            self.proc.kill()
            self.proc.wait()
            return self._finish(self._invalid(f"recipe plan did not finish within {self.timeout:.0f}s"))
        self._stdout.seek(0)
        self._stderr.seek(0)
        return self._finish(self._parse(returncode, self._stdout.read(), self._stderr.read()))

    def wait(self, seconds: float) -> Optional[PlanReport]:
        """Poll, sleeping at most `seconds` for the child; returns early when it exits."""
        if self.result is None and self.proc is not None:
            try:
                self.proc.wait(timeout=max(0.0, min(seconds, self.deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        return self.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def _parse(self, returncode: int, stdout: str, stderr: str) -> PlanReport:
        data = _parse_json_object(stdout)
        if data is None or returncode not in (0, 1):
            detail = _last_line(stderr) or _last_line(stdout) or f"exit code {returncode}"
            if detail.startswith("Error: "):
                detail = detail[len("Error: "):]
            return self._invalid(f"recipe plan failed: {detail}")
        if not data.get("valid", returncode == 0) or returncode != 0:
            error = data.get("error") or _last_line(stderr) or "invalid recipe"
            return self._invalid(" ".join(str(error).split()))
        return PlanReport(
            recipe=str(self.recipe),
            valid=True,
            name=data.get("name"),
            digest=data.get("digest") or file_digest(self.recipe),
            steps=list(data.get("steps") or []),
            watch=[str(p) for p in data.get("watch") or []],
            artifacts=list(data.get("artifacts") or []),
        )


def plan_recipe(recipe_cmd: Sequence[str], recipe: Path, env: dict[str, str],
                timeout: float = 300.0) -> PlanReport:
    """Plan one recipe and wait for it (for callers with nothing else to do meanwhile)."""
    child = PlanningChild(recipe_cmd, recipe, env, timeout)
    while (plan := child.wait(1.0)) is None:
        pass
    return plan
