"""Write the example recipes' datasets under recipes/data/ from the shapes-world generator (deterministic).

    python scripts/example_data.py          # rewrites recipes/data/shapes-*

Each dataset is ten 64 px images with their captions (`N.png` + `N.txt`), drawn from fixed seeds, so
the committed files can be checked by re-running this script and `git diff`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loraforge.world.generator import generate

ROOT = Path(__file__).resolve().parent.parent / "recipes" / "data"
SEEN_SHAPES = ("circle", "square", "triangle", "ring", "cross")

# name -> (first seed, split, fixed attributes, whether the shape cycles through the seen shapes)
DATASETS = {
    "shapes-striped": (9000, "all", {"style": "striped"}, True),
    "shapes-dotted": (9100, "all", {"style": "dotted"}, True),
    "shapes-star": (9200, "holdout", {"shape": "star", "style": "plain"}, False),
    "shapes-sks": (9200, "holdout", {"shape": "star", "style": "plain"}, False),
}
# Datasets whose captions name their concept by a trigger token instead of its word: the same star images,
# "a big green <sks> in the centre of a black background", for recipes/personalise-compare.yaml (textual
# inversion needs a token the tokenizer does not have; the other methods learn the same trigger).
TRIGGERS = {"shapes-sks": ("star", "<sks>")}


def write(name: str, count: int = 10) -> Path:
    first, split, fixed, cycle = DATASETS[name]
    folder = ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        shape = {"shape": SEEN_SHAPES[i % len(SEEN_SHAPES)]} if cycle else {}
        sample = generate(first + i, 64, split=split, **fixed, **shape)
        sample.image.save(folder / f"{i}.png")
        word, trigger = TRIGGERS.get(name, ("", ""))
        text = sample.caption.replace(word, trigger) if word else sample.caption
        (folder / f"{i}.txt").write_text(text + "\n")
    return folder


if __name__ == "__main__":
    for name in DATASETS:
        print(f"wrote {write(name).relative_to(ROOT.parent.parent)}")
