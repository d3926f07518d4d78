"""Black Forest Labs' Flux module names ⇄ diffusers' FluxTransformer2DModel paths: one table for checkpoints
(`double_blocks.0.img_attn.qkv.weight`) and for LoRAs in BFL, kohya (`lora_unet_double_blocks_0_img_attn_qkv`)
and XLabs spellings.

BFL fuses what diffusers keeps apart: a double block's `img_attn.qkv` is diffusers' `attn.to_q`/`to_k`/`to_v`
stacked by rows, `txt_attn.qkv` the `add_q/k/v_proj`, a single block's `linear1` is `to_q`/`to_k`/`to_v`/`proj_mlp`
(three of the hidden width, then the MLP's). Row splits are read from the shapes (the hidden width is linear1's
input width), so the table fits any Flux width. The final layer's adaLN modulation is (shift, scale) in BFL and
(scale, shift) in diffusers: its rows swap halves. RMSNorm weights are `scale` in BFL and `weight` in diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Row splits of a fused module: "thirds" (q, k, v) or "qkv_mlp" (q, k, v of the hidden width, then the MLP).
NONE, THIRDS, QKV_MLP = "none", "thirds", "qkv_mlp"


@dataclass(frozen=True)
class FluxModule:
    """One BFL module and the diffusers module(s) it is."""

    bfl: str  # "double_blocks.0.img_attn.qkv"
    diffusers: tuple[str, ...]  # ("transformer_blocks.0.attn.to_q", ...), several when `split` is not NONE
    split: str = NONE
    swap_halves: bool = False  # the rows are (shift, scale) in BFL, (scale, shift) in diffusers
    norm: bool = False  # an RMSNorm: its weight is `scale` in BFL

    @property
    def fused(self) -> bool:
        return self.split != NONE

    def split_sizes(self, rows: int, hidden: int) -> list[int]:
        """Rows of each diffusers module in the fused BFL weight of `rows` rows; `hidden`: the model width."""
        if self.split == THIRDS:
            return [rows // 3] * 3
        if self.split == QKV_MLP:
            return [hidden, hidden, hidden, rows - 3 * hidden]
        return [rows]


_DOUBLE = (  # (BFL suffix, diffusers suffixes, split, norm)
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), THIRDS, False),
    ("img_attn.proj", ("attn.to_out.0",), NONE, False),
    ("img_attn.norm.query_norm", ("attn.norm_q",), NONE, True),
    ("img_attn.norm.key_norm", ("attn.norm_k",), NONE, True),
    ("img_mlp.0", ("ff.net.0.proj",), NONE, False),
    ("img_mlp.2", ("ff.net.2",), NONE, False),
    ("img_mod.lin", ("norm1.linear",), NONE, False),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), THIRDS, False),
    ("txt_attn.proj", ("attn.to_add_out",), NONE, False),
    ("txt_attn.norm.query_norm", ("attn.norm_added_q",), NONE, True),
    ("txt_attn.norm.key_norm", ("attn.norm_added_k",), NONE, True),
    ("txt_mlp.0", ("ff_context.net.0.proj",), NONE, False),
    ("txt_mlp.2", ("ff_context.net.2",), NONE, False),
    ("txt_mod.lin", ("norm1_context.linear",), NONE, False),
)
_SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), QKV_MLP, False),
    ("linear2", ("proj_out",), NONE, False),
    ("norm.query_norm", ("attn.norm_q",), NONE, True),
    ("norm.key_norm", ("attn.norm_k",), NONE, True),
    ("modulation.lin", ("norm.linear",), NONE, False),
)
_GLOBAL = (  # guidance_in only in guidance-distilled models (FLUX.1-dev)
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
FINAL_MODULATION = FluxModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True)
DOUBLE_PREFIX, SINGLE_PREFIX = "double_blocks.", "single_blocks."
DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE = "transformer_blocks.", "single_transformer_blocks."
# Prefixes single files may wrap BFL names in (ComfyUI saves `model.diffusion_model.`).
BFL_WRAPPERS = ("model.diffusion_model.", "diffusion_model.")


def flux_modules(double_blocks: int, single_blocks: int, guidance: bool = True) -> list[FluxModule]:
    """Every module of a Flux transformer with this many double and single blocks."""
    out = [FluxModule(b, (d,)) for b, d in _GLOBAL if guidance or not b.startswith("guidance_in")]
    out.append(FINAL_MODULATION)
    for i in range(double_blocks):
        out += [FluxModule(f"{DOUBLE_PREFIX}{i}.{b}", tuple(f"{DIFFUSERS_DOUBLE}{i}.{d}" for d in ds), split, norm=n)
                for b, ds, split, n in _DOUBLE]
    for i in range(single_blocks):
        out += [FluxModule(f"{SINGLE_PREFIX}{i}.{b}", tuple(f"{DIFFUSERS_SINGLE}{i}.{d}" for d in ds), split, norm=n)
                for b, ds, split, n in _SINGLE]
    return out


_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def block_counts(names) -> tuple[int, int]:
    """(double blocks, single blocks) that module or tensor names (BFL or diffusers spelling) reach."""
    double = single = 0
    for name in names:
        for wrapper in BFL_WRAPPERS:
            name = name.removeprefix(wrapper)
        m = _BLOCK.match(name.removeprefix("transformer.") if name.startswith("transformer.transformer_blocks")
                         or name.startswith("transformer.single_") else name)
        if m:
            if m.group(1) in ("double_blocks", "transformer_blocks"):
                double = max(double, int(m.group(2)) + 1)
            else:
                single = max(single, int(m.group(2)) + 1)
    return double, single


def module_table(names, guidance: bool | None = None) -> dict[str, FluxModule]:
    """BFL module name → FluxModule for the blocks `names` (BFL or diffusers spelling) reach; `guidance` None:
    the guidance embedder is included (a table lookup for a module a model lacks simply finds nothing)."""
    double, single = block_counts(names)
    return {m.bfl: m for m in flux_modules(double, single, guidance=True if guidance is None else guidance)}


def diffusers_index(table: dict[str, FluxModule]) -> dict[str, tuple[FluxModule, int]]:
    """diffusers module path → (its FluxModule, its place among the module's diffusers parts)."""
    return {d: (m, i) for m in table.values() for i, d in enumerate(m.diffusers)}


def kohya_flat(bfl: str) -> str:
    """kohya's flattened spelling of a BFL module: `double_blocks.0.img_attn.qkv` → `double_blocks_0_img_attn_qkv`."""
    return bfl.replace(".", "_")


def kohya_index(table: dict[str, FluxModule]) -> dict[str, FluxModule]:
    """kohya flat name (without `lora_unet_`) → FluxModule."""
    return {kohya_flat(m.bfl): m for m in table.values()}


# Every Flux model's single-block MLP is four times its width (diffusers' FluxSingleTransformerBlock fixes
# mlp_ratio 4), so a fused linear1 whose MLP part an adapter leaves out still has a known height.
MLP_RATIO = 4
_DIFFUSERS_BLOCK_PARTS = {
    DIFFUSERS_DOUBLE: tuple(d for _, ds, _, _ in _DOUBLE for d in ds),
    DIFFUSERS_SINGLE: tuple(d for _, ds, _, _ in _SINGLE for d in ds),
}
_DIFFUSERS_GLOBALS = (*(d for _, d in _GLOBAL), *FINAL_MODULATION.diffusers)
_DIFFUSERS_IN_BLOCK = re.compile(r"^(transformer_blocks\.|single_transformer_blocks\.)\d+\.(.+)$")


def diffusers_module_of(path: str) -> str | None:
    """The Flux transformer module (diffusers path) that `path` — a module path or a tensor key inside the
    transformer, `transformer_blocks.0.attn.to_q.lora_A.weight` — belongs to; None when no Flux module is."""
    for module in _DIFFUSERS_GLOBALS:
        if path == module or path.startswith(module + "."):
            return module
    m = _DIFFUSERS_IN_BLOCK.match(path)
    if m:
        for part in _DIFFUSERS_BLOCK_PARTS[m.group(1)]:
            if m.group(2) == part or m.group(2).startswith(part + "."):
                return path[: len(path) - len(m.group(2))] + part
    return None
