"""The offline quickstart behind `make run`: applies `recipes/quickstart.yaml` when the recipe
engine is present, else builds the builtin base, imports an adapter and generates an image."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def run_demo(out: Path, home: str | None = None) -> None:
    from loraforge.formats import write_adapter
    from loraforge.models.builtin import ensure_builtin
    from loraforge.models.targets import module_shapes
    from loraforge.registry import Registry
    from loraforge.registry.importer import import_artifact
    from loraforge.render import generate_image
    from loraforge.synthetic import random_lora

    out.mkdir(parents=True, exist_ok=True)
    reg = Registry(home)
    t0 = time.perf_counter()
    base_path = ensure_builtin("tiny-sd", reg.home)
    print(f"base builtin:tiny-sd ready in {base_path} ({time.perf_counter() - t0:.1f}s)")
    adapter_file = out / "demo-style.kohya.safetensors"
    write_adapter(random_lora(module_shapes(base_path), rank=4, seed=7, std=0.3), adapter_file, "kohya")
    manifest = import_artifact(reg, adapter_file, "demo-style", base="builtin:tiny-sd")
    print(f"imported {adapter_file} as {manifest.ref} (sha256:{manifest.digest[:12]})")
    for weight in (0.0, 1.0):
        t0 = time.perf_counter()
        image = generate_image(reg, "builtin:tiny-sd", [f"{manifest.ref}={weight}"], "a photo of a cat", seed=1)
        path = out / f"demo-weight-{weight:g}.png"
        image.save(path)
        print(f"generated {path} with {manifest.ref}={weight:g} in {time.perf_counter() - t0:.1f}s")
    print("registry:")
    for row in reg.list():
        print(f"  {row['name']}:{row['version']}  {row['kind']}  sha256:{row['digest'][:12]}")
    print(f"outputs: {out.resolve()}  registry home: {reg.home}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", type=Path)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml", type=Path)
    args = parser.parse_args()
    from loraforge.quiet import quiet_library_logs

    quiet_library_logs()
    try:
        from loraforge.recipes.apply import apply_recipe_cli  # noqa: F401
    except ImportError:
        run_demo(args.out)
        return
    apply_recipe_cli(args.recipe, args.out)


if __name__ == "__main__":
    main()
