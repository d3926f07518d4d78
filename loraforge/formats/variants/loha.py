"""LoHa (`hada_w1_a/b`, `hada_w2_a/b`, optional Tucker cores `hada_t1/t2`): ΔW = (alpha/r) · (W₁ ⊙ W₂) with
each Wᵢ = hada_wi_a · hada_wi_b, so rank(ΔW) ≤ r₁·r₂."""

from __future__ import annotations

import math

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant


@register_variant
class LoHa(VariantModule):
    variant = "loha"
    description = "LoHa: Hadamard product of two low-rank matrices (hada_w1_a/b, hada_w2_a/b[, hada_t1/t2])"
    reference_url = "https://arxiv.org/abs/2108.06098"
    required = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    optional = frozenset({"hada_t1", "hada_t2"})

    @classmethod
    def claims(cls, suffixes: frozenset[str]) -> bool:
        return super().claims(suffixes) and ({"hada_t1", "hada_t2"} <= suffixes or not {"hada_t1", "hada_t2"} & suffixes)

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.tensors

    @property
    def records_kernel(self) -> bool:
        return self.tucker  # without Tucker cores lycoris stores a conv kernel flattened into hada_w*_b

    @property
    def rank(self) -> int:
        return int(self.tensors["hada_w1_b"].shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        t = self.tensors
        if self.tucker:  # w*_a: r×out, w*_b: r×in, t*: r×r×k×k
            shape = (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *(int(s) for s in t["hada_t1"].shape[2:]))
            other = (int(t["hada_w2_a"].shape[1]), int(t["hada_w2_b"].shape[1]), *(int(s) for s in t["hada_t2"].shape[2:]))
        else:  # w*_a: out×r, w*_b: r×in (a conv kernel flattened into in)
            shape = (int(t["hada_w1_a"].shape[0]), *(int(s) for s in t["hada_w1_b"].shape[1:]))
            other = (int(t["hada_w2_a"].shape[0]), *(int(s) for s in t["hada_w2_b"].shape[1:]))
            if t["hada_w1_a"].shape[1] != t["hada_w1_b"].shape[0] or t["hada_w2_a"].shape[1] != t["hada_w2_b"].shape[0]:
                raise ValueError("each hada_wi_a must have as many columns as hada_wi_b has rows")
        if shape != other:
            raise ValueError(f"the two Hadamard halves make {shape} and {other}")
        return shape

    @property
    def rank_bound(self) -> int:
        r1 = int(self.tensors["hada_w1_b"].shape[0])
        r2 = int(self.tensors["hada_w2_b"].shape[0])
        shape = self.weight_shape
        return min(r1 * r2, shape[0], math.prod(shape[1:]))

    def _delta(self, base_weight):
        import torch
        from lycoris.functional import loha

        # lycoris' argument order is (w1 down, w1 up, w2 down, w2 up, t1, t2): down is hada_w*_b.
        return loha.diff_weight(self._f32("hada_w1_b"), self._f32("hada_w1_a"), self._f32("hada_w2_b"),
                                self._f32("hada_w2_a"), self._f32("hada_t1"), self._f32("hada_t2"),
                                gamma=torch.tensor(self.scale), backend="torch")

    def lora_factors(self):
        """(B, A) in float32 with B·A = ΔW.flatten(1), of rank r₁·r₂: the Hadamard product of W₁ = U₁V₁ and
        W₂ = U₂V₂ is (U₁ ∗ U₂)(V₁ • V₂), the row-wise and column-wise Khatri–Rao products of the factors."""
        import torch

        halves = []
        for i in ("1", "2"):
            a, b = self._f32(f"hada_w{i}_a"), self._f32(f"hada_w{i}_b")
            if self.tucker:  # a: r×out, b: r×in, t: r×r×k×k → W = aᵀ · (t ×₂ b) flattened
                t = self._f32(f"hada_t{i}")
                halves.append((a.T, torch.einsum("pq...,qi->pi...", t, b).reshape(t.shape[0], -1)))
            else:
                halves.append((a, b.reshape(b.shape[0], -1)))
        (u1, v1), (u2, v2) = halves
        u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1) * self.scale
        v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
        return u, v
