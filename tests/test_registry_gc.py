"""`registry gc` next to other writers: it never deletes a blob a registration is about to reference,
and it removes the temp leftovers of dead processes but not those of live ones."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry, registry as registry_module
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run


@pytest.fixture()
def adapter_file(tmp_path, tiny_sd_path) -> Path:
    path = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=3), path, "kohya")
    return path


def test_gc_during_a_registration_waits_and_keeps_its_blob(home, adapter_file, tmp_path, monkeypatch):
    """Force the interleaving blob stored → gc → catalog commit; the artifact must survive whole."""
    real_immediate = registry_module.immediate
    gc_result: dict = {}

    def gc_in_another_thread():
        gc_result["freed"] = Registry(home).gc()

    def immediate_after_gc(db):
        # The registration has stored its blob and is about to commit: run gc now, from another
        # connection, and give it ample time to delete what it thinks is garbage.
        monkeypatch.setattr(registry_module, "immediate", real_immediate)
        gc_thread = threading.Thread(target=gc_in_another_thread)
        gc_thread.start()
        gc_thread.join(timeout=1.5)
        gc_result["blocked"] = gc_thread.is_alive()
        gc_result["thread"] = gc_thread
        return real_immediate(db)

    monkeypatch.setattr(registry_module, "immediate", immediate_after_gc)
    result = run(home, "registry", "import", str(adapter_file), "--name", "style")
    assert "registered style:1" in result.output
    gc_result["thread"].join(timeout=30)
    assert run(home, "registry", "verify").output.endswith("ok\n")
    assert gc_result["blocked"], "gc ran while a registration held blobs it had not yet referenced"
    assert gc_result["freed"] == (0, 0)
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "style", "--format", "kohya", "-o", str(out))
    assert out.read_bytes() and out.stat().st_size > 1000
