"""YAML aliases with a budget: every YAML file loraforge reads (recipes, lock files, model cards from the
Hub) is refused before it is built when its aliases would expand it without bound ("billion laughs")."""

from __future__ import annotations

from typing import Any

import yaml

# How many nodes aliases may add to a document beyond those written in it. Templates reused a few
# times add hundreds; a "billion laughs" file of 300 bytes would add 9**9 (and hang every reader).
MAX_ALIAS_NODES = 10_000


class AliasExpansionError(ValueError):
    """A document whose aliases expand too far or loop; `line`/`column` (1-based) name the anchor."""

    def __init__(self, line: int, column: int, message: str):
        super().__init__(message)
        self.line, self.column = line, column


def mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def check_expansion(root: yaml.Node, what: str = "document") -> None:
    """Raise AliasExpansionError if the aliases under `root` add more than MAX_ALIAS_NODES nodes, or loop.

    Sizes are memoised per node, so this costs one pass over the nodes as written, however large
    their expansion would be.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    added = 0

    def size(node: yaml.Node) -> int:
        nonlocal added
        key = id(node)
        if key in sizes:  # a second visit: this node is an alias's target, expanded again
            added += sizes[key]
            if added > MAX_ALIAS_NODES:
                raise AliasExpansionError(*mark(node), f"YAML aliases expand the {what} by more than "
                                          f"{MAX_ALIAS_NODES} nodes (this anchor alone is {sizes[key]}): write "
                                          "the repeated parts out, or use fewer nested aliases")
            return sizes[key]
        if key in active:
            raise AliasExpansionError(*mark(node), f"this anchor refers to itself through an alias; "
                                      f"a {what} must be a tree")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


# The loaders a document is read with, in order: libyaml's when PyYAML was built with it, ~10x faster than
# PyYAML's own (the lock file of a six-step recipe: 2 ms instead of 24), then PyYAML's own, which reads again
# what libyaml refuses for its clearer messages ("found undefined alias 'base'", not "found undefined alias").
YAML_LOADERS: tuple[type, ...] = ((yaml.CSafeLoader,) if getattr(yaml, "__with_libyaml__", False) else ()) + (
    yaml.SafeLoader,)


def safe_load(text: str, what: str = "document") -> Any:
    """`yaml.safe_load` of one document, after check_expansion (AliasExpansionError, or yaml.YAMLError)."""
    for fast in YAML_LOADERS[:-1]:
        try:
            return _safe_load(fast, text, what)
        except yaml.YAMLError:
            pass  # read again below for PyYAML's message
    return _safe_load(YAML_LOADERS[-1], text, what)


def _safe_load(loader_class: type, text: str, what: str) -> Any:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expansion(node, what)
        return loader.construct_document(node)
    finally:
        loader.dispose()
