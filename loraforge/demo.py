"""The offline quickstart behind `make run`: applies `recipes/quickstart.yaml` (builtin base, adapters,
images) and writes its outputs to --out."""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", type=Path)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", type=Path)
    args = parser.parse_args()
    from loraforge.quiet import quiet_library_logs
    from loraforge.recipes.apply import apply_recipe_cli

    quiet_library_logs()
    apply_recipe_cli(args.recipe, args.out)


if __name__ == "__main__":
    main()
