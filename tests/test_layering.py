"""Import layering: a lower layer never imports a higher one, and no import cycle joins packages or modules.

Every `import` counts, at module level or inside a function (a function-level import that hides a cycle
is still a cycle). Layers, top to bottom: cli → recipes / train / daemon → ops / hub / render / rewards →
registry → models → formats → leaf utilities. Packages of one layer may import each other, as long as
no cycle forms.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "loraforge"

# Top-level package or module of loraforge -> its layer (higher numbers sit higher).
LAYERS: dict[str, int] = {
    "cli": 6, "__main__": 6,
    "demo": 6,  # the demo script drives the whole library, as the CLI does
    "recipes": 5, "train": 5, "daemon": 5,
    "ops": 4, "hub": 4, "render": 4, "rewards": 4,
    "evaluators": 4,  # scores images against prompts (the shapes judge), as rewards score them
    "registry": 3,
    "models": 2,
    "synthetic": 2,  # seeded demo inputs: builds LoRA states and checkpoints from formats' types
    "world": 2,  # the procedural shapes world (generator, captions, styles) and its judge
    "formats": 1,
    # Leaf utilities, imported from anywhere, importing only each other.
    "": 0,  # loraforge/__init__.py: the version
    "errors": 0, "hashing": 0, "home": 0, "plugins": 0, "quiet": 0, "stopping": 0, "faults": 0,
    "yaml_aliases": 0, "reference": 0, "lazy": 0,
    "families": 0,  # what each model family is (denoiser, text encoders, pipeline class): imports only errors
}

# Module cycles tolerated for now (none: formats.detect <-> peft_folder and recipes.digest <-> schema are
# broken). An entry is a frozenset of dotted module names; add one only with the change that breaks it.
ALLOWED_MODULE_CYCLES: set[frozenset[str]] = set()


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under the package folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth, relative ones resolved.

    `from pkg import name` counts as an import of `pkg.name` when that is a module, else of `pkg`.
    """
    found = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add((sub if sub in modules else source, node.lineno))
    root = module.split(".")[0]
    return {(name, line) for name, line in found if name == root or name.startswith(root + ".")}


def top(module: str) -> str:
    """The top-level package or module of loraforge a dotted name belongs to ('' for loraforge itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, set[tuple[str, int]]]]:
    modules = module_files(root)
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The cycles of `graph`: its strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layering_problems(root: Path, layers: dict[str, int], allowed_cycles: set[frozenset[str]]) -> list[str]:
    """One line per violation: an upward import, a package cycle, a module cycle not allowed."""
    modules, imports = import_graph(root)
    problems = []
    for name in sorted({top(m) for m in modules} - set(layers)):
        problems.append(f"{root.name}.{name} has no layer: add it to LAYERS in tests/test_layering.py")
    package_graph: dict[str, set[str]] = defaultdict(set)
    module_graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in imports.items():
        for target, line in sorted(targets):
            here, there = top(module), top(target)
            if here != there:
                package_graph[here].add(there)
                if here in layers and there in layers and layers[here] < layers[there]:
                    problems.append(f"{module} (line {line}) imports {target}: layer {here or root.name} "
                                    f"({layers[here]}) is below {there} ({layers[there]})")
            # A package's __init__ only re-exports its modules; importing it is importing them.
            if target in modules and target != module and modules[target].name != "__init__.py":
                module_graph[module].add(target)
    for cycle in strongly_connected(package_graph):
        problems.append(f"import cycle between packages: {' <-> '.join(sorted(cycle))}")
    for cycle in strongly_connected(module_graph):
        if frozenset(cycle) not in allowed_cycles:
            problems.append(f"import cycle between modules: {' <-> '.join(sorted(cycle))}")
    return problems


def test_no_layer_imports_a_higher_one_and_no_cycles():
    assert layering_problems(PACKAGE_ROOT, LAYERS, ALLOWED_MODULE_CYCLES) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_sees_function_level_upward_imports_and_hidden_cycles(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from pkg.high import b\n",  # upward, hidden in a function
        "low/c.py": "from . import d\n",
        "low/d.py": "def g():\n    from .c import x\n",  # a module cycle through a function-level import
        "high/__init__.py": "",
        "high/b.py": "import pkg.low.a\n",
    })
    problems = layering_problems(root, {"": 0, "low": 1, "high": 2}, set())
    assert problems == [
        "pkg.low.a (line 2) imports pkg.high.b: layer low (1) is below high (2)",
        "import cycle between packages: high <-> low",
        "import cycle between modules: pkg.high.b <-> pkg.low.a",
        "import cycle between modules: pkg.low.c <-> pkg.low.d",
    ]
    assert layering_problems(root, {"": 0, "low": 1}, set())[0] == (
        "pkg.high has no layer: add it to LAYERS in tests/test_layering.py")
