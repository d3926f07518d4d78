"""Incremental recipes: a second `recipe apply` with nothing changed vs the first, in-process and as a process.

The figure the tests used to assert ("a second apply takes under 2 s") lives here: on a 2-core box the
no-op apply should stay a small fraction of the build and of interpreter start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import best_of

N_ADAPTERS = 10  # independent synthetic adapters, then one concat merge of all of them and a stack


def recipe_text(n: int) -> str:
    steps = "".join(f"  a{i}:\n    synthetic: {{kind: lora, seed: {i}, rank: 2}}\n" for i in range(n))
    refs = ", ".join(f"{{ref: '${{a{i}}}'}}" for i in range(n))
    return (f"name: bench\nsteps:\n{steps}"
            f"  merged:\n    lora_merge: {{method: concat, adapters: [{refs}]}}\n"
            f"  stacked:\n    stack: {{adapters: [{{ref: '${{merged}}'}}, {{ref: '${{a0}}', weight: -1}}]}}\n")


def _apply(registry, path: Path) -> tuple[float, dict]:
    from loraforge.recipes.apply import apply_recipe

    t0 = time.perf_counter()
    result = apply_recipe(path, registry)
    seconds = time.perf_counter() - t0
    result.raise_for_failure()
    actions: dict[str, int] = {}
    for r in result.results:
        actions[r.action] = actions.get(r.action, 0) + 1
    return seconds, actions



def main() -> None:
    from loraforge.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        home, path = Path(tmp) / "home", Path(tmp) / "bench.yaml"
        path.write_text(recipe_text(N_ADAPTERS))
        registry = Registry(home)
        first_s, first = _apply(registry, path)
        second_s, second = min((_apply(registry, path) for _ in range(3)), key=lambda r: r[0])
        assert second == {"reused": N_ADAPTERS + 2}, second  # a benchmark of a rebuild would mislead
        env = {**os.environ, "LORAFORGE_HOME": str(home)}
        cli = [sys.executable, "-m", "loraforge", "recipe"]
        cli_apply_s = best_of(lambda: subprocess.run(cli + ["apply", str(path)], env=env, check=True,
                                                   capture_output=True), 2)
        cli_plan_s = best_of(lambda: subprocess.run(cli + ["plan", str(path), "--json"], env=env, check=True,
                                                  capture_output=True), 2)
        start_s = best_of(lambda: subprocess.run([sys.executable, "-m", "loraforge", "--help"], env=env,
                                               check=True, capture_output=True), 2)
    steps = N_ADAPTERS + 2
    print(f"\nrecipe of {steps} steps ({N_ADAPTERS} synthetic adapters, a concat merge, a stack)")
    print(f"{'operation':<52}{'seconds':>10}{'ratio':>10}")
    print(f"{'first apply (builds every step, in-process)':<52}{first_s:>10.3f}{1.0:>10.4f}")
    print(f"{'second apply, nothing changed (in-process)':<52}{second_s:>10.3f}{second_s / first_s:>10.4f}")
    print(f"{'loraforge recipe apply, nothing changed (process)':<52}{cli_apply_s:>10.3f}")
    print(f"{'loraforge recipe plan --json (process)':<52}{cli_plan_s:>10.3f}")
    print(f"{'loraforge --help (interpreter + CLI start)':<52}{start_s:>10.3f}")
    print(f"no-op apply per step: {1000 * second_s / steps:.1f} ms in-process")


if __name__ == "__main__":
    main()
