"""Asks the recipe engine for a plan (`recipe plan FILE --json`) in a child process."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from loraforge.hashing import sha256_file


@dataclass
class Plan:
    recipe: str
    valid: bool
    error: Optional[str] = None
    name: Optional[str] = None
    digest: Optional[str] = None
    steps: list[dict] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)

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


def plan_recipe(recipe_cmd: Sequence[str], recipe: Path, env: dict[str, str], timeout: float = 300.0,
                on_start: Optional[Callable[[Optional[subprocess.Popen]], None]] = None) -> Plan:
    """Run the planner; any failure (bad recipe, crash, hang) becomes an invalid Plan, never an exception.

    `on_start` receives the planner process (and None when it is done), so a stopping daemon can kill it.
    """
    recipe = Path(recipe)
    cmd = [*recipe_cmd, "recipe", "plan", str(recipe), "--json"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        return Plan(str(recipe), False, f"cannot run the recipe planner: {exc}", digest=file_digest(recipe))
    if on_start:
        on_start(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return Plan(str(recipe), False, f"recipe plan did not finish within {timeout:.0f}s",
                    digest=file_digest(recipe))
    finally:
        if on_start:
            on_start(None)
    returncode = proc.returncode
    data = _parse_json_object(stdout)
    if data is None or returncode not in (0, 1):
        detail = _last_line(stderr) or _last_line(stdout) or f"exit code {returncode}"
        if detail.startswith("Error: "):
            detail = detail[len("Error: "):]
        return Plan(str(recipe), False, f"recipe plan failed: {detail}", digest=file_digest(recipe))
    if not data.get("valid", returncode == 0) or returncode != 0:
        error = data.get("error") or _last_line(stderr) or "invalid recipe"
        return Plan(str(recipe), False, " ".join(str(error).split()), digest=file_digest(recipe))
    return Plan(
        recipe=str(recipe),
        valid=True,
        name=data.get("name"),
        digest=data.get("digest") or file_digest(recipe),
        steps=list(data.get("steps") or []),
        watch=[str(p) for p in data.get("watch") or []],
    )
