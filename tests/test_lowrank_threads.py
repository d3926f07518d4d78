"""Small LoRA algebra runs on one intra-op thread (torch's threads only cost time there when the machine is
busy), gives the same numbers as on torch's threads, and leaves the thread count as it found it."""

from __future__ import annotations

import pytest
import torch

from loraforge.ops import lowrank
from loraforge.ops.lora_merge import combine_states
from loraforge.ops.resize import resize_state
from loraforge.ops.threads import SMALL_FLOPS, threads_for
from loraforge.synthetic import random_lora

# mixed shapes (linear and conv) and ranks across modules and adapters
SHAPES = {"unet": {"a.to_q": (64, 48), "b.to_k": (80, 32), "c.to_v": (16, 8, 3, 3), "d.to_out.0": (40, 40),
                   "e.to_q": (64, 48)}}


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def states():
    return [random_lora(SHAPES, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v"), seed=1),
            random_lora(SHAPES, rank=6, targets=("to_q", "to_v", "to_out.0"), seed=2),
            random_lora(SHAPES, rank=3, alpha=6.0, targets=("to_q", "to_k"), seed=3)]


def record_threads(monkeypatch) -> list[int]:
    """The intra-op thread count at each QR and SVD torch runs from now on."""
    seen: list[int] = []
    for fn in ("qr", "svd"):
        original = getattr(torch.linalg, fn)

        def spy(*args, _original=original, **kwargs):
            seen.append(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, fn, spy)
    return seen


@pytest.mark.parametrize("method,rank", [("svd", 5), ("ties", 5), ("dare", 5)])
def test_small_merges_run_on_one_thread_and_restore_the_count(two_threads, states, monkeypatch, method, rank):
    seen = record_threads(monkeypatch)
    combine_states(states, [0.5, 0.3, -0.2], method, rank)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_resize_runs_on_one_thread(two_threads, states, monkeypatch):
    seen = record_threads(monkeypatch)
    resize_state(states[1], 2)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_when_the_algebra_fails(two_threads, states, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("linalg.svd: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(RuntimeError, match="failed to converge"):
        combine_states(states, [0.5, 0.3, -0.2], "svd", 5)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        with threads_for(10.0):
            assert torch.get_num_threads() == 1
            raise ValueError("inside")
    assert torch.get_num_threads() == 2


def test_big_problems_keep_torchs_threads(two_threads):
    with threads_for(SMALL_FLOPS):
        assert torch.get_num_threads() == 2
        with threads_for(1.0):  # nested: a small part of a big problem
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    # a full SVD of a 1500×1500 matrix is big, a rank-16 randomized one or a QR of thin factors is not
    assert lowrank.dense_factors_flops(1500, 1500, 1000) >= SMALL_FLOPS
    assert lowrank.dense_factors_flops(1280, 1280, 16) < SMALL_FLOPS
    assert lowrank.refactor_flops(1280, 1280, 64) < SMALL_FLOPS


@pytest.mark.parametrize("method,rank", [("svd", 5), ("svd", 13), ("concat", None), ("ties", 5), ("dare", 5)])
def test_one_thread_gives_the_numbers_of_torchs_threads(two_threads, states, monkeypatch, method, rank):
    params = {"drop_rate": 0.3, "seed": 1} if method == "dare" else {}
    pinned = combine_states(states, [0.5, 0.3, -0.2], method, rank, params)
    from loraforge.ops import threads

    monkeypatch.setattr(threads, "SMALL_FLOPS", 0.0)  # every problem on torch's two threads, as before
    free = combine_states(states, [0.5, 0.3, -0.2], method, rank, params)
    assert sorted(pinned) == sorted(free)
    for name in free:
        want = free[name].delta().double()
        assert pinned[name].rank == free[name].rank
        assert float((pinned[name].delta().double() - want).norm()) <= 1e-5 * float(want.norm()), name
