"""Edge cases found in review: a read-only catalog table, a `~user` reference, a digest index shared by
two processes, a damaged index file, a write that fails at its last flush, a stack on the wrong family."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.errors import ConfigError, StorageError


def test_writing_a_subsystem_table_of_a_read_only_home_is_one_storage_error(home):
    from loraforge.registry import Registry
    from loraforge.registry.tables import open_table
    from loraforge.rewards.cache import RewardCache  # noqa: F401  (registers the rewards migrations)

    Registry(home)
    table = open_table(home, "rewards", "reward_cache", read_only=True)
    with pytest.raises(StorageError, match="is read-only: cannot write the reward_cache table"):
        table.insert({"key": "k"})
    with pytest.raises(StorageError, match="read-only"):
        with table.transaction():
            pass


def test_a_tilde_reference_for_an_unknown_user_is_a_config_error():
    from loraforge.reference import Reference

    with pytest.raises(ConfigError, match="no user 'nosuchuser_loraforge'"):
        Reference.parse("~nosuchuser_loraforge/model.safetensors")


def test_digest_indexes_saved_by_two_processes_keep_both_entries(tmp_path):
    from loraforge.hashing import DigestIndex

    old = 1_000_000_000
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
        import os
        os.utime(tmp_path / name, (old, old))
    index_file = tmp_path / "index.json"
    first, second = DigestIndex(index_file), DigestIndex(index_file)
    first.file_digest(tmp_path / "a")
    second.file_digest(tmp_path / "b")
    first.save()
    second.save()
    third = DigestIndex(index_file)
    third.file_digest(tmp_path / "a")
    third.file_digest(tmp_path / "b")
    assert third.hashed == {}, "an index saved later must not drop what another one saved"


@pytest.mark.parametrize("files", [[], {"x": 5}, {"x": [1, 2]}, "nope"])
def test_a_damaged_digest_index_is_ignored(tmp_path, files):
    from loraforge.hashing import DIGEST_INDEX_VERSION, DigestIndex

    (tmp_path / "f").write_text("x")
    index_file = tmp_path / "index.json"
    index_file.write_text(json.dumps({"version": DIGEST_INDEX_VERSION, "files": files}))
    index = DigestIndex(index_file)
    assert len(index.file_digest(tmp_path / "f")) == 64


def test_a_write_that_fails_at_its_last_flush_leaves_no_partial_file(tmp_path, monkeypatch):
    import os

    from loraforge.formats import safetensors_io

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "fsync", full_disk)
    with pytest.raises(OSError):
        safetensors_io.write_safetensors({"w": torch.ones(4)}, tmp_path / "out.safetensors", fsync=True)
    assert os.listdir(tmp_path) == []
