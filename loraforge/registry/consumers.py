"""The programs that load what `registry export` writes, and the file format each one needs.

`registry export --for TOOL` picks the format from here, so a user names the program they will load
the file in rather than a key layout. ComfyUI and A1111 match LoRA keys by their kohya names
(`lora_unet_…`, `lora_te…`): a diffusers-keyed file loads only in part there (ComfyUI leaves its UNet
attention keys unapplied), so both get kohya files. Plain Python, no torch: the CLI builds its help
from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.errors import ConfigError


@dataclass(frozen=True)
class Consumer:
    """One program that loads exported files: the adapter format and checkpoint layout it reads."""

    name: str  # the `--for` value
    tool: str  # how users know the program
    adapter_format: str  # a registered adapter format name
    checkpoint_layout: str | None  # "single_file" or "diffusers"; None: it loads no checkpoints
    embedding_format: str | None = None  # "diffusers" or "a1111" (formats.embeddings); None: it loads none


CONSUMERS: dict[str, Consumer] = {c.name: c for c in (
    Consumer("comfyui", "ComfyUI (LoraLoader, checkpoint loaders)", "kohya", "single_file", "a1111"),
    Consumer("a1111", "AUTOMATIC1111 / Forge WebUI", "kohya", "single_file", "a1111"),
    Consumer("kohya", "kohya sd-scripts", "kohya", "single_file", "a1111"),
    Consumer("diffusers", "diffusers (load_lora_weights, load_textual_inversion, from_pretrained)", "diffusers",
             "diffusers", "diffusers"),
    Consumer("peft", "PEFT (PeftModel.from_pretrained, one folder per model)", "peft", None),
)}

ADAPTER_KINDS = ("lora", "slider")
DEFAULT_ADAPTER_FORMAT = "diffusers"


def consumers_help() -> str:
    """`--for`'s help text: which format each program gets."""
    return "Program that will load the file; picks the format: " + "; ".join(
        f"{c.name}: {c.adapter_format}" + (f" (checkpoints: {c.checkpoint_layout.replace('_', '-')})"
                                           if c.checkpoint_layout else "")
        for c in CONSUMERS.values()) + "; embeddings: " + ", ".join(
        f"{c.name} {c.embedding_format}" for c in CONSUMERS.values() if c.embedding_format) + "."


def export_format(kind: str, fmt: str | None, consumer: str | None) -> str | None:
    """The format to export an artifact of `kind` in, from `--format` and `--for` as given (None: not given).

    An adapter or embedding with neither gets diffusers; a checkpoint or dataset with neither gets None (as stored).
    A `--for` whose format contradicts `--format` is refused, naming both."""
    if consumer is None:
        return fmt if fmt is not None else (DEFAULT_ADAPTER_FORMAT if kind in ADAPTER_KINDS + ("embedding",) else None)
    if consumer not in CONSUMERS:
        raise ConfigError(f"unknown --for {consumer!r}; known: {', '.join(CONSUMERS)}")
    c = CONSUMERS[consumer]
    if kind in ADAPTER_KINDS:
        needed = c.adapter_format
    elif kind == "checkpoint":
        if c.checkpoint_layout is None:
            loaders = ", ".join(n for n, other in CONSUMERS.items() if other.checkpoint_layout)
            raise ConfigError(f"{c.tool} loads adapters, not checkpoints; use --for with one of {loaders}")
        needed = c.checkpoint_layout
    elif kind == "embedding":
        if c.embedding_format is None:
            loaders = ", ".join(n for n, other in CONSUMERS.items() if other.embedding_format)
            raise ConfigError(f"{c.tool} loads adapters of modules, not token embeddings; use --for with one of {loaders}")
        needed = c.embedding_format
    else:
        raise ConfigError(f"a {kind} is exported as stored; drop --for {consumer}")
    given = fmt.replace("-", "_") if fmt is not None else None
    if given is not None and given != needed:
        raise ConfigError(f"--for {consumer} needs --format {needed.replace('_', '-')}, not --format {fmt} "
                          f"({c.tool} reads {needed.replace('_', '-')} files); drop one of the two options")
    return needed
