"""LoKr (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, optional Tucker core `lokr_t2`):
ΔW = scale · W₁ ⊗ W₂, so rank(ΔW) = rank(W₁)·rank(W₂). scale is alpha / r when a half is factored
(r its inner dimension) and 1 when both halves are full matrices, as LyCORIS trains it."""

from __future__ import annotations

import math

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant


@register_variant
class LoKr(VariantModule):
    variant = "lokr"
    description = "LoKr: Kronecker product of two (optionally low-rank) matrices (lokr_w1[_a/_b], lokr_w2[_a/_b][, lokr_t2])"
    reference_url = "https://arxiv.org/abs/2309.14859"
    required = frozenset()
    optional = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})

    @classmethod
    def claims(cls, suffixes: frozenset[str]) -> bool:
        if not suffixes <= cls.optional:
            return False
        w1 = ("lokr_w1" in suffixes) != ({"lokr_w1_a", "lokr_w1_b"} <= suffixes)
        w1_parts = ("lokr_w1_a" in suffixes) == ("lokr_w1_b" in suffixes)
        w2 = ("lokr_w2" in suffixes) != ({"lokr_w2_a", "lokr_w2_b"} <= suffixes)
        w2_parts = ("lokr_w2_a" in suffixes) == ("lokr_w2_b" in suffixes)
        t2 = "lokr_t2" not in suffixes or "lokr_w2_a" in suffixes
        return w1 and w1_parts and w2 and w2_parts and t2

    @property
    def inner_rank(self) -> int | None:
        """r of the factored half (None when both halves are full)."""
        if "lokr_w1_b" in self.tensors:
            return int(self.tensors["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in self.tensors:
            return int(self.tensors["lokr_w2_b"].shape[0])
        return None

    @property
    def records_kernel(self) -> bool:
        # A full lokr_w2 keeps the kernel (out×in×k×k), as a Tucker core does; a factored lokr_w2_b without
        # one holds it flattened (r × in·k·k), which reads like a Linear half.
        return "lokr_w2" in self.tensors or "lokr_t2" in self.tensors

    @property
    def rank(self) -> int:
        return self.inner_rank or self.rank_bound

    @property
    def scale(self) -> float:
        r = self.inner_rank
        if r is None:
            return 1.0
        return (self.alpha if self.alpha is not None else r) / r

    def _w1_shape(self) -> tuple[int, int]:
        t = self.tensors
        if "lokr_w1" in t:
            return int(t["lokr_w1"].shape[0]), int(t["lokr_w1"].shape[1])
        if t["lokr_w1_a"].shape[1] != t["lokr_w1_b"].shape[0]:
            raise ValueError("lokr_w1_a's columns must match lokr_w1_b's rows")
        return int(t["lokr_w1_a"].shape[0]), int(t["lokr_w1_b"].shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        t = self.tensors
        if "lokr_w2" in t:
            return tuple(int(s) for s in t["lokr_w2"].shape)
        a, b = t["lokr_w2_a"], t["lokr_w2_b"]
        if "lokr_t2" in t:  # a: r×out, b: r×in, t2: r×r×k×k
            return (int(a.shape[1]), int(b.shape[1]), *(int(s) for s in t["lokr_t2"].shape[2:]))
        if a.shape[1] != b.shape[0]:
            raise ValueError("lokr_w2_a's columns must match lokr_w2_b's rows")
        return (int(a.shape[0]), *(int(s) for s in b.shape[1:]))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        (a, b), w2 = self._w1_shape(), self._w2_shape()
        return (a * w2[0], b * w2[1], *w2[2:])

    @property
    def rank_bound(self) -> int:
        (a, b), w2 = self._w1_shape(), self._w2_shape()
        r1 = int(self.tensors["lokr_w1_b"].shape[0]) if "lokr_w1_b" in self.tensors else min(a, b)
        r2 = int(self.tensors["lokr_w2_b"].shape[0]) if "lokr_w2_b" in self.tensors else min(w2[0], math.prod(w2[1:]))
        shape = self.weight_shape
        return min(r1 * r2, shape[0], math.prod(shape[1:]))

    def _delta(self, base_weight):
        from lycoris.functional import lokr

        # kron_weight with LyCORIS' module scale (functional diff_weight derives r differently for Tucker).
        return lokr.kron_weight(self._f32("lokr_w1"), self._f32("lokr_w1_a"), self._f32("lokr_w1_b"),
                                self._f32("lokr_w2"), self._f32("lokr_w2_a"), self._f32("lokr_w2_b"),
                                self._f32("lokr_t2"), scale=self.scale, backend="torch")

    def lora_factors(self):
        """(B, A) in float32 with B·A = ΔW.flatten(1): W₁ ⊗ W₂ = (U₁ ⊗ U₂)(V₁ ⊗ V₂) for factorisations
        Wᵢ = UᵢVᵢ (the stored low-rank halves, or a full half against the identity on its shorter side)."""
        import torch

        t = self.tensors
        if "lokr_w1" in t:
            u1, v1 = _against_identity(self._f32("lokr_w1"))
        else:
            u1, v1 = self._f32("lokr_w1_a"), self._f32("lokr_w1_b")
        if "lokr_w2" in t:
            w2 = self._f32("lokr_w2")
            u2, v2 = _against_identity(w2.reshape(w2.shape[0], -1))
        elif "lokr_t2" in t:  # a: r×out, b: r×in, t2: r×r×k×k
            a, b, core = self._f32("lokr_w2_a"), self._f32("lokr_w2_b"), self._f32("lokr_t2")
            u2, v2 = a.T, torch.einsum("pq...,qi->pi...", core, b).reshape(core.shape[0], -1)
        else:
            b = self._f32("lokr_w2_b")
            u2, v2 = self._f32("lokr_w2_a"), b.reshape(b.shape[0], -1)
        u1, u2, v1, v2 = (x.contiguous() for x in (u1, u2, v1, v2))
        return torch.kron(u1, u2) * self.scale, torch.kron(v1, v2)


def _against_identity(w):
    """(U, V) with U·V = w and inner size min(rows, cols): w against an identity."""
    import torch

    if w.shape[0] <= w.shape[1]:
        return torch.eye(w.shape[0]), w
    return w, torch.eye(w.shape[1])
