"""One TIES and one DARE for both merge families: the shared primitives against PEFT's `merge_utils` and a
plain-Python reference, then `merge checkpoints` and `merge loras` on the same deltas giving the same ΔW."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from loraforge.formats import read_adapter, write_adapter
from loraforge.formats.lora import LoraModule, LoraState
from loraforge.ops import sparsify
from loraforge.registry import Registry

from cli_helpers import run_cli as run
from sparsify_reference import dare_reference, ties_reference, trim_reference

SHAPES = [(7,), (5, 6), (4, 3, 2, 2), (33, 40)]


def random_taus(shape, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("shape", SHAPES)
def test_trim_and_ties_match_peft_for_equal_weights(shape):
    taus = random_taus(shape, 3, seed=len(shape))
    for t in taus:
        torch.testing.assert_close(sparsify.trim_to_density(t, 0.3), merge_utils.magnitude_based_pruning(t, 0.3))
    # PEFT elects the sign from the unweighted trimmed deltas; with equal weights that is the weighted election
    want = merge_utils.ties(taus, torch.tensor([0.5, 0.5, 0.5]), density=0.3)
    torch.testing.assert_close(sparsify.ties_merge(taus, [0.5, 0.5, 0.5], 0.3), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [[0.7, -0.3, 0.25], [2.0, 0.5, 1.0], [0.4]])
def test_ties_matches_the_elementwise_reference(shape, weights):
    taus = random_taus(shape, len(weights), seed=11)
    got = sparsify.ties_merge(taus, weights, 0.4)
    torch.testing.assert_close(got.double(), ties_reference(taus, weights, 0.4), rtol=1e-6, atol=1e-7)


def test_ties_averages_agreeing_entries_without_renormalising_the_weights():
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.1]), torch.tensor([-3.0, -1.0, 2.0, 0.2])
    # density 0.5 keeps [0, -2, 3, 0] and [-3, 0, 2, 0]; weighted by 0.5 and 0.25: [0, -1, 1.5, 0] and
    # [-0.75, 0, 0.5, 0]; elected signs -, -, +, + (a zero sum elects +); means of the agreeing entries
    got = sparsify.ties_merge([t1, t2], [0.5, 0.25], 0.5)
    assert got.tolist() == [-0.75, -1.0, 1.0, 0.0]
    # one model: its weighted trim, not the trim alone
    assert sparsify.ties_merge([t1], [0.5], 0.5).tolist() == [0.0, -1.0, 1.5, 0.0]
    assert trim_reference(t1.tolist(), 0.5) == [0.0, -2.0, 3.0, 0.0]


def test_dare_matches_peft_dare_linear_given_the_same_masks(monkeypatch):
    taus = random_taus((20, 12), 3, seed=5)
    weights, p = [0.5, -0.2, 1.5], 0.6
    keeps = [sparsify.dare_keep(3, "unet/x.weight", i, p, t.shape) for i, t in enumerate(taus)]
    masks = iter(keeps)
    # PEFT draws its masks from the global generator; hand it ours so the combination can be compared
    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda t, density, rescale: t * next(masks) / density)
    want = merge_utils.dare_linear(taus, torch.tensor(weights), density=1 - p)
    got = sparsify.dare_merge(taus, weights, p, keeps)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.double(), dare_reference(taus, weights, p, keeps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [sparsify.DARE_BLOCK_ELEMENTS, 100])
def test_dare_masks_are_seeded_by_tensor_and_task_not_by_chunk(monkeypatch, block):
    monkeypatch.setattr(sparsify, "DARE_BLOCK_ELEMENTS", block)  # 100: blocks of 4 rows, crossed by the chunks
    shape, p = (300, 7, 3), 0.3
    full = sparsify.dare_keep(9, "unet/a.weight", 1, p, shape)
    assert full.shape == shape and abs(full.float().mean().item() - 0.7) < 0.03
    for rows_per_chunk in (1, 7, 64, 299):
        spans = [(r, min(r + rows_per_chunk, shape[0])) for r in range(0, shape[0], rows_per_chunk)]
        chunks = [sparsify.dare_keep(9, "unet/a.weight", 1, p, shape, span) for span in spans]
        assert torch.equal(torch.cat(chunks), full), rows_per_chunk
    for other in ((10, "unet/a.weight", 1), (9, "unet/b.weight", 1), (9, "unet/a.weight", 2)):
        assert not torch.equal(sparsify.dare_keep(*other, p, shape), full), other
    # 0-d and 1-d tensors are one row of one element per entry
    assert sparsify.dare_keep(9, "s", 0, p, ()).shape == () and sparsify.dare_keep(9, "v", 0, p, (5,)).shape == (5,)


def test_dare_refuses_a_drop_rate_outside_0_1():
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError, match="drop_rate 1.0"):
        sparsify.dare_keep(0, "k", 0, 1.0, (3,))


# ---- both families on the same deltas -------------------------------------------------------------

MODULES = {  # linear, rectangular linear and 3×3 conv modules of the tiny SD1 UNet; full rank 32 for all
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
    "down_blocks.0.resnets.0.conv1": (32, 32, 3, 3),
}
UNET = "unet/diffusion_pytorch_model.safetensors"
WEIGHTS = (0.5, 0.25)


def dyadic(shape, gen, scale_bits):
    """Random multiples of 2^-10 below 2^-scale_bits: sums and products of a few stay exact in float32,
    so base + ΔW − base is exactly ΔW and both families see bit-identical deltas."""
    return torch.randint(-(1 << (10 - scale_bits)), 1 << (10 - scale_bits), shape, generator=gen).float() / 1024


def random_dyadic_lora(seed: int) -> LoraState:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, shape in MODULES.items():
        down = dyadic((4, *shape[1:]), gen, 1)
        up = dyadic((shape[0], 4, 1, 1) if len(shape) == 4 else (shape[0], 4), gen, 1)
        modules[f"unet.{path}"] = LoraModule(down=down, up=up, alpha=4.0)  # scale 1
    return LoraState(modules)


@pytest.fixture()
def same_deltas(home, tiny_sd_path, tmp_path):
    """A base checkpoint, two checkpoints base + ΔW_A / base + ΔW_B, and the LoRAs A, B registered."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sd_path, base)
    state = load_file(base / UNET)
    gen = torch.Generator().manual_seed(0)
    for path in MODULES:
        state[path + ".weight"] = dyadic(state[path + ".weight"].shape, gen, 3)
    save_file(state, base / UNET, metadata={"format": "pt"})
    deltas = {}
    for label, seed in (("a", 1), ("b", 2)):
        lora = random_dyadic_lora(seed)
        write_adapter(lora, tmp_path / f"{label}.safetensors", "kohya")
        run(home, "registry", "import", str(tmp_path / f"{label}.safetensors"), "--name", f"lora-{label}",
            "--base", "builtin:tiny-sd")
        folder = tmp_path / label
        shutil.copytree(base, folder)
        tuned = dict(state)
        for path in MODULES:
            tuned[path + ".weight"] = state[path + ".weight"] + lora[f"unet.{path}"].delta()
            assert torch.equal(tuned[path + ".weight"] - state[path + ".weight"], lora[f"unet.{path}"].delta())
        save_file(tuned, folder / UNET, metadata={"format": "pt"})
        deltas[label] = {path: lora[f"unet.{path}"].delta() for path in MODULES}
    return {"base": base, "a": tmp_path / "a", "b": tmp_path / "b", "deltas": deltas, "out": tmp_path}


def both_families(home, same, method, params):
    """(ΔW of `merge checkpoints`, ΔW of `merge loras`) per module, for `method` with weights 0.5 and 0.25."""
    out = same["out"] / f"ckpt-{method}"
    run(home, "merge", "checkpoints", str(same["base"]), f"{same['a']}={WEIGHTS[0]}", f"{same['b']}={WEIGHTS[1]}",
        "--method", method, "--alpha", "1", *params, "--dtype", "fp32", "-o", str(out))
    run(home, "merge", "loras", f"lora-a={WEIGHTS[0]}", f"lora-b={WEIGHTS[1]}", "--method", method,
        "--rank", "32", *params, "--name", f"lora-{method}")
    merged, base = load_file(out / UNET), load_file(same["base"] / UNET)
    for key in base:  # everything the deltas do not touch is the base, unchanged
        if key[: -len(".weight")] not in MODULES:
            assert torch.equal(merged[key], base[key]), key
    reg = Registry(home)
    lora, _, _ = read_adapter(reg.primary_file(reg.resolve(f"lora-{method}")))
    ckpt = {path: merged[path + ".weight"] - base[path + ".weight"] for path in MODULES}
    return ckpt, {path: lora[f"unet.{path}"].delta() for path in MODULES}


def test_ties_is_the_same_for_checkpoints_and_loras(home, same_deltas):
    ckpt, lora = both_families(home, same_deltas, "ties", ["--param", "density=0.3"])
    for path in MODULES:
        taus = [same_deltas["deltas"][label][path] for label in "ab"]
        want = ties_reference(taus, list(WEIGHTS), 0.3).float()
        torch.testing.assert_close(ckpt[path], want, rtol=0, atol=1e-6, msg=path)
        torch.testing.assert_close(lora[path], want, rtol=1e-5, atol=1e-5, msg=path)


def test_dare_is_the_same_for_checkpoints_and_loras(home, same_deltas):
    ckpt, lora = both_families(home, same_deltas, "dare", ["--param", "drop_rate=0.5", "--param", "seed=3"])
    for path, shape in MODULES.items():
        taus = [same_deltas["deltas"][label][path] for label in "ab"]
        keeps = [sparsify.dare_keep(3, f"unet/{path}.weight", i, 0.5, shape) for i in range(2)]
        want = dare_reference(taus, list(WEIGHTS), 0.5, keeps).float()
        torch.testing.assert_close(ckpt[path], want, rtol=0, atol=1e-6, msg=path)
        torch.testing.assert_close(lora[path], want, rtol=1e-5, atol=1e-5, msg=path)


def test_checkpoint_dare_does_not_depend_on_the_chunk_size(home, same_deltas, monkeypatch):
    from loraforge.ops import merge
    from loraforge.ops.merge_methods.dare import Dare

    # small mask blocks so the tiny tensors span several; the block size is fixed, only the chunking varies
    monkeypatch.setattr(sparsify, "DARE_BLOCK_ELEMENTS", 500)
    outputs = []
    for chunk in (500, 1000, 37):  # chunks of whole blocks (as the method asks for), then others
        monkeypatch.setattr(Dare, "chunk_elements", chunk)
        monkeypatch.setattr(merge, "CHUNK_ELEMENTS", chunk)
        out = same_deltas["out"] / f"dare-{chunk}"
        run(home, "merge", "checkpoints", str(same_deltas["base"]), str(same_deltas["a"]), str(same_deltas["b"]),
            "--method", "dare", "--param", "drop_rate=0.5", "--param", "seed=1", "--dtype", "fp32", "-o", str(out))
        outputs.append((out / UNET).read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_both_families_share_one_default_for_each_parameter(method):
    """Without --param, `merge checkpoints` and `merge loras` sparsify the same deltas the same way."""
    from loraforge.plugins import LORA_METHODS, MERGE_METHODS

    checkpoint, lora = MERGE_METHODS.get(method).params, LORA_METHODS.get(method).params
    assert {k: lora[k] for k in checkpoint} == checkpoint
