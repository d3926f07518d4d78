"""Incremental recipes: a second `recipe apply` with nothing changed vs the first, in-process and as a process.

The figure the tests used to assert ("a second apply takes under 2 s") lives here: on a 2-core box the
no-op apply should stay a small fraction of the build. As processes, a no-op apply, `recipe plan --json`
and `recipe validate` are measured side by side with `loraforge --help` (interpreter and CLI start-up):
commands that compute nothing import no torch, so each should take <= 0.3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import Figure, best_of

N_ADAPTERS = 10  # independent synthetic adapters, then one concat merge of all of them and a stack
GOAL_S = 0.3  # a command that computes nothing, as a process


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



def main() -> list[Figure]:
    from loraforge.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        home, path = Path(tmp) / "home", Path(tmp) / "bench.yaml"
        path.write_text(recipe_text(N_ADAPTERS))
        registry = Registry(home)
        first_s, first = _apply(registry, path)
        second_s, second = min((_apply(registry, path) for _ in range(3)), key=lambda r: r[0])
        assert second == {"reused": N_ADAPTERS + 2}, second  # a benchmark of a rebuild would mislead
        # Start-up is measured with the bytecode cache, as an installed loraforge runs.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["LORAFORGE_HOME"] = str(home)

        def process_s(*args: str) -> float:
            command = [sys.executable, "-m", "loraforge", *args]
            subprocess.run(command, env=env, check=True, capture_output=True)  # warm: writes the bytecode cache
            return best_of(lambda: subprocess.run(command, env=env, check=True, capture_output=True), 3)

        cli_apply_s = process_s("recipe", "apply", str(path))
        cli_plan_s = process_s("recipe", "plan", str(path), "--json")
        cli_validate_s = process_s("recipe", "validate", str(path))
        start_s = process_s("--help")
    steps = N_ADAPTERS + 2
    print(f"\nrecipe of {steps} steps ({N_ADAPTERS} synthetic adapters, a concat merge, a stack)")
    print(f"{'operation':<52}{'seconds':>10}{'ratio':>10}")
    print(f"{'first apply (builds every step, in-process)':<52}{first_s:>10.3f}{1.0:>10.4f}")
    print(f"{'second apply, nothing changed (in-process)':<52}{second_s:>10.3f}{second_s / first_s:>10.4f}")
    print(f"{'loraforge recipe apply, nothing changed (process)':<52}{cli_apply_s:>10.3f}")
    print(f"{'loraforge recipe plan --json (process)':<52}{cli_plan_s:>10.3f}")
    print(f"{'loraforge recipe validate (process)':<52}{cli_validate_s:>10.3f}")
    print(f"{'loraforge --help (interpreter + CLI start)':<52}{start_s:>10.3f}")
    print(f"no-op apply per step: {1000 * second_s / steps:.1f} ms in-process")
    baseline = "loraforge --help (process)"
    goal = f"<= {GOAL_S} s"
    return [Figure(f"recipe apply, nothing changed, {steps} steps (process)", cli_apply_s, baseline, start_s, goal,
                   cli_apply_s <= GOAL_S),
            Figure(f"recipe plan --json, {steps} steps (process)", cli_plan_s, baseline, start_s, goal,
                   cli_plan_s <= GOAL_S),
            Figure(f"recipe validate, {steps} steps (process)", cli_validate_s, baseline, start_s, goal,
                   cli_validate_s <= GOAL_S),
            Figure(f"recipe apply, nothing changed, {steps} steps (in-process)", second_s,
                   "first apply (in-process)", first_s)]


if __name__ == "__main__":
    main()
