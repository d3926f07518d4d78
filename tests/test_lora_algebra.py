"""LoRA algebra: exact sums, Eckart–Young optimal SVD merges, TIES/DARE on dense deltas, CLI provenance."""

from __future__ import annotations


import pytest
import torch

from loraforge.formats import read_adapter, write_adapter
from loraforge.models.targets import module_shapes
from loraforge.ops.lora_merge import combine_states
from loraforge.ops.lowrank import choose_rank, dense_factors
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run
from sparsify_reference import ties_reference

SHAPES = {"unet": {"a.to_q": (64, 48), "b.to_k": (80, 32), "c.to_v": (16, 8, 3, 3), "d.to_out.0": (40, 40)}}


@pytest.fixture()
def states():
    s1 = random_lora(SHAPES, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v"), seed=1)
    s2 = random_lora(SHAPES, rank=6, targets=("to_q", "to_v", "to_out.0"), seed=2)
    s3 = random_lora(SHAPES, rank=3, alpha=6.0, targets=("to_q", "to_k"), seed=3)
    return [s1, s2, s3]


WEIGHTS = [0.5, 0.3, -0.2]


def exact_sum(states, weights):
    names = set().union(*[set(s) for s in states])
    return {n: sum(w * s[n].delta().double() for s, w in zip(states, weights) if n in s) for n in names}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method,rank", [("concat", None), ("svd", 13), ("svd", 40)])
def test_exact_weighted_sum(states, method, rank):
    out = combine_states(states, WEIGHTS, method, rank)
    exact = exact_sum(states, WEIGHTS)
    assert sorted(out) == sorted(exact)  # union of the target sets
    for name, want in exact.items():
        assert rel(out[name].delta(), want) < 1e-5, name
    if method == "concat":
        assert out["unet.a.to_q"].rank == 13 and out["unet.b.to_k"].rank == 7 and out["unet.d.to_out.0"].rank == 6


def test_svd_merge_is_the_eckart_young_optimum(states):
    out = combine_states(states, WEIGHTS, "svd", 3)
    for name, want in exact_sum(states, WEIGHTS).items():
        flat = want.flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = out[name].delta().double().flatten(1)
        assert out[name].rank == 3
        # the same matrix as the dense truncation, so the same (minimal) error
        assert rel(got, best) < 1e-5, name
        assert abs(float((got - flat).norm()) - float(s[3:].norm())) < 1e-6 * float(s.norm())


def test_ties_and_dare_match_dense_references(states):
    out = combine_states(states, WEIGHTS, "ties", 40, {"density": 0.4})
    for name in out:
        present = [(s[name].delta().flatten(1), w) for s, w in zip(states, WEIGHTS) if name in s]
        want = ties_reference([d for d, _ in present], [w for _, w in present], 0.4)
        u, s, vh = torch.linalg.svd(want.double(), full_matrices=False)
        r = min(40, s.numel())
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert rel(out[name].delta().flatten(1), best) < 1e-4, name

    first = combine_states(states, WEIGHTS, "dare", 8, {"drop_rate": 0.5, "seed": 4})
    again = combine_states(states, WEIGHTS, "dare", 8, {"drop_rate": 0.5, "seed": 4})
    other = combine_states(states, WEIGHTS, "dare", 8, {"drop_rate": 0.5, "seed": 5})
    assert all(torch.equal(first[n].delta(), again[n].delta()) for n in first)
    assert not torch.equal(first["unet.a.to_q"].delta(), other["unet.a.to_q"].delta())
    # with nothing dropped DARE is the exact sum (here re-factored at full rank)
    full = combine_states(states, WEIGHTS, "dare", 48, {"drop_rate": 0.0})
    for name, want in exact_sum(states, WEIGHTS).items():
        assert rel(full[name].delta(), want) < 1e-5


def test_randomized_truncation_and_rank_rules():
    gen = torch.Generator().manual_seed(0)
    m = (torch.randn(300, 12, generator=gen) @ torch.randn(12, 200, generator=gen))
    m += 1e-3 * torch.randn(300, 200, generator=gen)
    b, a, s = dense_factors(m, 12, randomized=True)
    u, sf, vh = torch.linalg.svd(m, full_matrices=False)
    best = (u[:, :12] * sf[:12]) @ vh[:12]
    assert float((b @ a - m).norm()) <= 1.01 * float((best - m).norm())
    s_all = torch.tensor([4.0, 2.0, 1.0, 0.5])
    # energies 16, 4, 1, 0.25 of 21.25: the first value holds 75 %, two hold 94 %
    assert choose_rank(s_all, "sv_fro", 0.7, 10) == 1
    assert choose_rank(s_all, "sv_fro", 0.8, 10) == 2
    assert choose_rank(s_all, "sv_fro", 0.99, 2) == 2  # capped
    assert choose_rank(s_all, "sv_ratio", 3, 10) == 2
    assert choose_rank(s_all, "fixed", 3, 10) == 3


@pytest.fixture()
def registered(home, tiny_sd_path, tiny_sdxl_path, tmp_path):
    shapes = module_shapes(tiny_sd_path)
    for i, (name, rank) in enumerate((("style", 4), ("subject", 2))):
        state = random_lora(shapes, rank=rank, components=("unet", "text_encoder"),
                            targets=("to_q", "to_v", "q_proj") if i else ("to_k", "to_v", "v_proj"), seed=10 + i)
        write_adapter(state, tmp_path / f"{name}.safetensors", "kohya")
        run(home, "registry", "import", str(tmp_path / f"{name}.safetensors"), "--name", name, "--base", "builtin:tiny-sd")
    xl = random_lora(module_shapes(tiny_sdxl_path), rank=2, seed=3)
    write_adapter(xl, tmp_path / "xl.safetensors", "kohya")
    run(home, "registry", "import", str(tmp_path / "xl.safetensors"), "--name", "xl", "--base", "builtin:tiny-sdxl")
    return Registry(home)


def test_cli_merge_loras_registers_exact_sum_with_provenance(home, registered):
    run(home, "merge", "loras", "style:1=0.7", "subject=-0.4", "--method", "svd", "--rank", "6", "--name", "mix")
    reg = Registry(home)
    m = reg.resolve("mix")
    assert m.kind == "lora" and m.provenance.method == "lora_merge:svd" and m.provenance.params["rank"] == 6
    assert [(p.ref, p.digest, p.weight) for p in m.provenance.parents] == [
        ("style:1", reg.resolve("style:1").digest, 0.7), ("subject:1", reg.resolve("subject:1").digest, -0.4)]
    assert m.base is not None and m.base.family == "sd1"
    merged, _, _ = read_adapter(reg.primary_file(m))
    inputs = [read_adapter(reg.primary_file(reg.resolve(r)))[0] for r in ("style:1", "subject:1")]
    for name, want in exact_sum(inputs, [0.7, -0.4]).items():
        assert rel(merged[name].delta(), want) < 1e-5, name


def test_cli_merge_loras_errors(home, registered):
    for args, words in (
        (["style=1", "xl=1", "--name", "bad"], ("xl:1", "SDXL", "SD1.x")),
        (["style=1", "subject=1", "--method", "nope", "--name", "bad"], ("nope",)),
        (["style=1", "--method", "ties", "--param", "dens=0.2", "--name", "bad"], ("dens",)),
        (["style=1", "--rank", "0", "--name", "bad"], ("rank",)),
    ):
        result = run(home, "merge", "loras", *args, ok=False)
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert line.startswith("Error: ") and "\n" not in line and all(w in line for w in words), line
    assert not Registry(home).exists("bad")
