"""Loading a base pipeline and attaching weighted adapters through diffusers' LoRA loader.

LyCORIS variants load exactly: a LoHa, LoKr or Tucker LoCon module enters diffusers' loader as the LoRA
pair of its exact ΔW (its own low-rank factors at the variant's rank bound), so per-adapter weights work as for
any LoRA. Modules without a low-rank form that small — full differences, DoRA (whose ΔW = W' − W comes from
the pipeline's own base weight), bias and norm-layer differences — are added to the pipeline's weights once,
scaled by the adapter's weight: exact, and cheaper than a full-rank LoRA pair.

Textual-inversion embeddings (formats.embeddings.Embedding) ride in the same adapter lists: they are loaded
with diffusers' own `load_textual_inversion` (SDXL: once per text encoder, clip_l and clip_g), and take no
weight — a token is in the prompt or not.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from loraforge.registry.refs import parse_weighted


def reweightable(state) -> bool:
    """Whether an embedding (whose weight is refused anyway) or every module of `state` loads through diffusers' LoRA loader, so `set_adapters` can change its
    weight later; full, DoRA, bias and norm differences are added to the weights once, at the weight given."""
    from loraforge.formats.embeddings import Embedding

    if isinstance(state, Embedding):
        return True
    return state.is_plain_lora or all(
        (m.variant == "lora" or (hasattr(m, "lora_factors") and not m.needs_base))
        and (not hasattr(m, "bias_delta") or m.bias_delta() is None)
        for m in state.values())


def apply_adapters(pipe, adapters: Sequence[tuple[object, float]], prefix: str = "lf",
                   base_ref: str = "the base") -> list[str | None]:
    """Load (LoraState, weight) pairs into `pipe` as named diffusers adapters and activate them; an adapter with
    a module `pipe` lacks (norm layers included, whatever the base's layout) is refused before anything loads.
    Gives each adapter's diffusers name, in order: None for one whose every module was added to the weights,
    and for an embedding (loaded with `load_embedding`; a weight other than 1 is refused before anything loads)."""
    from loraforge.formats import lora_to_diffusers
    from loraforge.formats.embeddings import Embedding
    from loraforge.models.pipeline import lora_target_names

    targets = lora_target_names(pipe, with_norms=True)
    for state, weight in adapters:
        state.check_against(targets)
        if isinstance(state, Embedding):
            check_embedding_weight(state, weight)
    names, weights = [], []
    pristine: dict = {}  # base weights as loaded, for DoRA modules of any adapter
    for i, (state, weight) in enumerate(adapters):
        name = f"{prefix}{i}"
        if isinstance(state, Embedding):
            load_embedding(pipe, state, base_ref)
            names.append(None)
            weights.append(1.0)
            continue
        state = loadable_state(pipe, state, float(weight), pristine)
        weights.append(float(weight))
        if not state:
            names.append(None)
            continue
        state_dict, _meta = lora_to_diffusers(state)
        with warnings.catch_warnings():
            # PEFT warns each time a second adapter joins a model; several adapters are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(dict(state_dict), adapter_name=name)
        names.append(name)
    if any(n is not None for n in names):
        pipe.set_adapters([n for n in names if n is not None],
                          adapter_weights=[w for n, w in zip(names, weights) if n is not None])
    return names


def check_embedding_weight(embedding, weight: float) -> None:
    """An embedding adds a token to the prompt vocabulary; it has no strength to scale: refuse any weight but 1."""
    from loraforge.errors import ConfigError

    if float(weight) != 1.0:
        raise ConfigError(f"embedding '{embedding.token}' was given weight {float(weight):g}: an embedding adds the "
                          f"token {embedding.token} to prompts and has no weight (nor a sweep); give it without =W "
                          "and write the token in the prompt")


def load_embedding(pipe, embedding, base_ref: str = "the base") -> None:
    """Load `embedding` into `pipe` with diffusers' `load_textual_inversion`: SD1 as a {token: vectors} state dict,
    SDXL once per encoder with its tokenizer and text encoder (clip_l rows into text_encoder, clip_g rows into
    text_encoder_2), as diffusers documents. Refused first, in one line, when it does not fit the pipeline."""
    from loraforge.models.text_encoders import check_embedding_fits, pipeline_text_encoders

    check_embedding_fits(embedding, pipeline_text_encoders(pipe), base_ref)
    if embedding.family == "sd1":
        pipe.load_textual_inversion({embedding.token: embedding.vectors["text_encoder"]}, token=embedding.token)
        return
    for component, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        pipe.load_textual_inversion(embedding.vectors[component], token=embedding.token,
                                    text_encoder=getattr(pipe, component), tokenizer=getattr(pipe, tok))


def _layer(pipe, name: str):
    from loraforge.formats.lora import without_text_model

    component, path = name.split(".", 1)
    model = getattr(pipe, component)
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(without_text_model(path))


def loadable_state(pipe, state, weight: float, pristine: dict | None = None):
    """`state` with its LoHa/LoKr/Tucker modules as exact LoRA pairs for diffusers' loader; the changes of
    full, DoRA, bias and norm modules are added to `pipe`'s parameters here, times `weight` (`pristine` keeps
    the base weights a DoRA module is computed from). A plain LoRA adapter is returned as it is."""
    if state.is_plain_lora:
        return state
    import torch

    from loraforge.formats.lora import LoraState
    from loraforge.ops.variant_lowrank import to_lora_module

    pristine = {} if pristine is None else pristine
    out = LoraState(hints=state.hints)
    for name in state:
        module = state[name]
        layer = _layer(pipe, name)
        bias = module.bias_delta() if hasattr(module, "bias_delta") else None
        if bias is not None:
            with torch.no_grad():
                layer.bias.add_((bias * weight).to(layer.bias))
        if module.variant == "lora":
            out[name] = module
        elif hasattr(module, "lora_factors") and not module.needs_base:
            out[name], _error = to_lora_module(module, shape=tuple(layer.weight.shape), name=name)
        else:
            base = None
            if module.needs_base:
                base = pristine.setdefault(name, layer.weight.detach().to("cpu", torch.float32, copy=True))
            delta = module.delta(base_weight=base).reshape(layer.weight.shape)
            with torch.no_grad():
                layer.weight.add_((delta * weight).to(layer.weight))
    return out


def load_pipeline_with_adapters(registry, base_ref: str, lora_specs: Sequence[str], device=None, config=None):
    """(pipeline, base, [(state, weight, manifest)]) for a base reference and `REF=W` adapter specs; `config`:
    the diffusers folder a single-file base is read with (models.base_config.with_config)."""
    from loraforge.models.base_config import with_config
    from loraforge.models.pipeline import load_pipeline
    from loraforge.registry.resolve import base_targets, load_adapter, resolve_base

    base = with_config(resolve_base(registry, base_ref), config)
    targets = base_targets(base)
    loaded = []
    for spec in lora_specs:
        ref, weight = parse_weighted(spec)
        state, manifest = load_adapter(registry, ref, base=base)
        if targets is not None:
            state.check_against(targets)
        loaded.append((state, weight, manifest))
    pipe = load_pipeline(base, device=device)
    apply_adapters(pipe, [(s, w) for s, w, _ in loaded], base_ref=base.ref)
    return pipe, base, loaded
