"""Adapter formats are plugins: one from an entry point is detected, read and written like a built-in,
and every safetensors read or write in the library goes through `loraforge.formats.safetensors_io`."""

from __future__ import annotations

import ast
import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import loraforge
import loraforge.plugins as plugins
from loraforge.errors import FormatError
from loraforge.formats import AdapterFormat, FileProbe, LoraModule, LoraState, detect_format, read_adapter, write_adapter
from loraforge.formats.adapter_format import FORMAT_PLUGINS

MAGIC = b'{"json_lora":'


def _detect(probe: FileProbe) -> bool:
    if probe.container != "other":
        return False
    with open(probe.path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _read(path: Path, module_names) -> tuple[LoraState, dict[str, str]]:
    modules = json.loads(Path(path).read_text())["json_lora"]
    return LoraState({name: LoraModule(torch.tensor(m["down"]), torch.tensor(m["up"]), m["alpha"])
                      for name, m in modules.items()}), {}


def _write(state: LoraState, path: Path, metadata) -> list[Path]:
    modules = {name: {"down": m.down.tolist(), "up": m.up.tolist(), "alpha": m.alpha} for name, m in state.items()}
    path.write_text(json.dumps({"json_lora": modules}))
    return [path]


JSON_LORA = AdapterFormat("json_lora", "LoRA factors as JSON lists (a test plugin)", _read, _write, _detect)


def not_a_format(path):
    """A reader function named where the format record belongs."""


@pytest.fixture
def installed(monkeypatch):
    """Install entry points of the `loraforge.formats` group; the built-ins stay registered."""

    def install(*eps: EntryPoint) -> None:
        FORMAT_PLUGINS.names()
        monkeypatch.setattr(FORMAT_PLUGINS, "_loaded", False)
        monkeypatch.setattr(FORMAT_PLUGINS, "_plugins", dict(FORMAT_PLUGINS._plugins))
        real = plugins.entry_points
        monkeypatch.setattr(plugins, "entry_points", lambda *, group="", **kw:
                            list(eps) if group == "loraforge.formats" else real(group=group, **kw))

    return install


def _state() -> LoraState:
    gen = torch.Generator().manual_seed(0)
    return LoraState({"unet.down_blocks.0.attentions.0.proj_in": LoraModule(
        torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 1.0)})


def test_a_format_from_an_entry_point_is_detected_read_and_written_like_a_builtin(installed, tmp_path):
    installed(EntryPoint("json_lora", f"{__name__}:JSON_LORA", "loraforge.formats"))
    state = _state()
    path = tmp_path / "adapter.txt"
    assert write_adapter(state, path, "json_lora") == [path]
    assert detect_format(path) == "json_lora"
    back, fmt, metadata = read_adapter(path)
    assert fmt == "json_lora" and metadata == {}
    name = "unet.down_blocks.0.attentions.0.proj_in"
    assert list(back) == [name] and back[name].alpha == 1.0
    assert torch.equal(back[name].down, state[name].down) and torch.equal(back[name].up, state[name].up)
    info = FORMAT_PLUGINS.info("json_lora")
    assert info.source == __name__ and info.description == "LoRA factors as JSON lists (a test plugin)"
    # the built-ins are untouched: a plugin's file converts to kohya through the same entry points
    kohya = tmp_path / "adapter.safetensors"
    write_adapter(back, kohya, "kohya")
    assert detect_format(kohya) == "kohya"


def test_an_entry_point_that_is_not_a_format_is_refused_in_one_line(installed, tmp_path):
    installed(EntryPoint("broken", f"{__name__}:not_a_format", "loraforge.formats"))
    path = tmp_path / "adapter.safetensors"
    with pytest.raises(FormatError) as info:
        write_adapter(_state(), path, "kohya")
    assert str(info.value) == (f"adapter format plugin 'broken' from {__name__} is not an AdapterFormat named "
                               "'broken'; fix that package's loraforge.formats entry point")


def test_two_formats_claiming_one_file_is_an_error_not_a_guess(installed, tmp_path):
    greedy = AdapterFormat("greedy", "claims every safetensors file", _read, _write,
                           lambda probe: probe.container == "safetensors")
    globals()["GREEDY"] = greedy
    installed(EntryPoint("greedy", f"{__name__}:GREEDY", "loraforge.formats"))
    path = tmp_path / "adapter.safetensors"
    write_adapter(_state(), path, "kohya")
    with pytest.raises(FormatError, match=r"claimed by several adapter formats \(greedy, kohya\)"):
        detect_format(path)


# -- one safetensors I/O module ----------------------------------------------------------------

IO_MODULE = "loraforge/formats/safetensors_io.py"


def test_only_the_io_module_touches_the_safetensors_package():
    """No library module imports `safetensors` or calls its readers and writers but `safetensors_io`,
    so every file read gets the checked header and every file written the deterministic layout."""
    root = Path(loraforge.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == IO_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n == "safetensors" or n.startswith("safetensors.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == [], f"import safetensors through {IO_MODULE}: {offenders}"
    assert not (root / "ops" / "tensors.py").exists() and not (root / "formats" / "detect.py").exists()


def test_loraforge_plugins_lists_the_adapter_formats():
    from click.testing import CliRunner

    from loraforge.cli import cli

    result = CliRunner().invoke(cli, ["plugins", "--group", "formats", "--json"])
    assert result.exit_code == 0, result.output
    assert {"diffusers", "kohya", "loraforge", "peft", "slider_pt"} <= {p["name"] for p in json.loads(result.output)}
