"""The names of the visual-anagram views and how a view spec is read (`loraforge.render.illusion` builds them).

Reading a spec needs no tensors, so a recipe's `views:` are checked without importing torch.
"""

from __future__ import annotations

from loraforge.errors import ConfigError

VIEW_NAMES = ("identity", "vflip", "hflip", "rot90", "rot180", "rot270", "negate", "jigsaw")


def parse_view(spec: str) -> tuple[str, int, int]:
    """(name, grid, seed) of a view spec: a simple view (grid and seed 0), or jigsaw[:GRID[:SEED]] (4×4, seed 0)."""
    name = str(spec).strip().lower()
    if name in VIEW_NAMES and name != "jigsaw":
        return name, 0, 0
    if name == "jigsaw" or name.startswith("jigsaw:"):
        parts = name.split(":")[1:]
        try:
            grid = int(parts[0]) if parts else 4
            seed = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            grid = 0
        if grid < 2 or len(parts) > 2:
            raise ConfigError(f"bad jigsaw view {spec!r}: use jigsaw, jigsaw:GRID or jigsaw:GRID:SEED with GRID >= 2")
        return "jigsaw", grid, seed
    raise ConfigError(f"unknown illusion view {spec!r}: choose one of {', '.join(VIEW_NAMES)}")
