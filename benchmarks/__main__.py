"""Run the benchmarks: `python -m benchmarks` runs every `bench_*.py`; `python -m benchmarks merge` only
those whose name contains `merge`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

from benchmarks import Figure, summary


def discover(patterns: list[str]) -> list[str]:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    return [n for n in names if not patterns or any(p in n for p in patterns)]


def main(argv: list[str]) -> int:
    names = discover(argv)
    if not names:
        print(f"no benchmark matches {' '.join(argv)}", file=sys.stderr)
        return 1
    figures: list[Figure] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        if not hasattr(module, "main"):
            continue
        print(f"== {name} ==", flush=True)
        start = time.perf_counter()
        figures += module.main() or []
        print(f"== {name} done in {time.perf_counter() - start:.1f} s ==\n", flush=True)
    if figures:
        print("== summary: each figure against its baseline, measured side by side in this run ==")
        print(summary(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
