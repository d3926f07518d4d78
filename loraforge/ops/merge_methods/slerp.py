"""Spherical linear interpolation of each (flattened) tensor, lerp when nearly colinear."""

from __future__ import annotations

import math

from pydantic import Field

from loraforge.ops.merge_methods import MergeMethod
from loraforge.ops.method_params import MethodParams
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("slerp", reference_url="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/slerp.py")
class Slerp(MergeMethod):
    """Spherical interpolation from A (t=0) to B (t=1), per tensor."""

    name = "slerp"
    default_alpha = 0.5
    elementwise = False  # needs whole-tensor norms and angle

    class Params(MethodParams):
        epsilon: float = Field(1e-4, gt=0, description="interpolate linearly when 1 - |cos| is below it, > 0")

    params = Params().model_dump()

    def weights(self, alpha, weights):
        return [1.0 - alpha, alpha]

    def merge(self, tensors, alpha, weights, params, ctx):
        import torch

        a, b = tensors
        t = float(alpha)
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return a.mul_(1 - t).add_(b, alpha=t)
        cos = float(torch.dot(a.flatten() / na, b.flatten() / nb).clamp(-1.0, 1.0))
        if 1.0 - abs(cos) < float(params["epsilon"]):
            return a.mul_(1 - t).add_(b, alpha=t)
        omega = math.acos(cos)
        so = math.sin(omega)
        return a.mul_(math.sin((1 - t) * omega) / so).add_(b, alpha=math.sin(t * omega) / so)
