"""Print the declared dependency floors of pyproject.toml as exact pins (`name>=X` → `name==X`), so that
`make test-min` installs the oldest versions loraforge claims to support and runs the tests on them.

torch is left out: it comes from TORCH_SPEC like in every other target (its floor is the one not exercised
here, since older CPU builds of torch are not available on our machines).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*>=\s*([0-9][^,;\s]*)\s*$")


def pins(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    out = []
    for spec in specs:
        match = FLOOR.match(spec)
        if match is None:
            raise SystemExit(f"Error: dependency {spec!r} has no plain `>=` floor; write it as NAME>=VERSION")
        name, version = match.groups()
        if name.lower() != "torch":
            out.append(f"{name}=={version}")
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in pins()))
