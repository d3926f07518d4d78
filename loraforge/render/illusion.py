"""Visual anagrams: one image that reads as a different prompt under each view (flip, rotation, negation, jigsaw).

At every denoising step, for each view vᵢ with prompt pᵢ: εᵢ = vᵢ⁻¹(ε_CFG(vᵢ(x_t), pᵢ)); the step uses the
mean of the εᵢ. Views act on latents (B, C, H, W); flips and rotations commute with the VAE closely,
negation and jigsaw less so at the VAE's resolution (the image decoded from vᵢ(x₀) is what prompt i saw).

Entry points: `illusion_sample(pipe, prompts, views, ...)` for a loaded SD1 pipeline, and
`render_illusion(registry, base_ref, lora_specs, prompts, views, ...)` for recipe `render` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from loraforge.errors import ConfigError
from loraforge.render.views import parse_view


@dataclass(frozen=True)
class View:
    """An invertible linear transform of latents; `apply` and `inverse` take (…, H, W) tensors."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    square: bool = False  # needs H == W


def _jigsaw(grid: int, seed: int) -> View:
    """A fixed permutation of grid×grid square patches (patch k of the output is patch perm[k] of the input)."""
    perm = torch.randperm(grid * grid, generator=torch.Generator("cpu").manual_seed(seed))
    inv = torch.argsort(perm)

    def permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        *lead, h, w = x.shape
        if h % grid or w % grid:
            raise ConfigError(f"jigsaw view: latent size {h}x{w} is not divisible by the grid {grid}; "
                              f"choose a size whose latent side is a multiple of {grid}")
        ph, pw = h // grid, w // grid
        patches = x.reshape(*lead, grid, ph, grid, pw).movedim(-3, -2).reshape(*lead, grid * grid, ph, pw)
        patches = patches[..., order.to(x.device), :, :]
        return patches.reshape(*lead, grid, grid, ph, pw).movedim(-2, -3).reshape(*lead, h, w)

    return View(f"jigsaw:{grid}:{seed}", lambda x: permute(x, perm), lambda x: permute(x, inv))


_SIMPLE: dict[str, View] = {
    "identity": View("identity", lambda x: x, lambda x: x),
    "vflip": View("vflip", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "hflip": View("hflip", lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "rot90": View("rot90", lambda x: torch.rot90(x, 1, (-2, -1)), lambda x: torch.rot90(x, -1, (-2, -1)), square=True),
    "rot180": View("rot180", lambda x: torch.rot90(x, 2, (-2, -1)), lambda x: torch.rot90(x, -2, (-2, -1))),
    "rot270": View("rot270", lambda x: torch.rot90(x, -1, (-2, -1)), lambda x: torch.rot90(x, 1, (-2, -1)), square=True),
    "negate": View("negate", lambda x: -x, lambda x: -x),
}


def get_view(spec: str | View) -> View:
    """A view by name: identity, vflip, hflip, rot90, rot180, rot270, negate, or jigsaw[:GRID[:SEED]] (4×4, seed 0)."""
    if isinstance(spec, View):
        return spec
    name, grid, seed = parse_view(spec)
    return _jigsaw(grid, seed) if name == "jigsaw" else _SIMPLE[name]


def get_views(specs: Sequence[str | View]) -> list[View]:
    if not specs:
        raise ConfigError("an illusion needs at least one view (e.g. identity, vflip)")
    return [get_view(s) for s in specs]


def split_view_prompts(prompt: str, n_views: int) -> list[str]:
    """Per-view prompts from one string "p1 | p2 | …" (the form prompt lists and files use)."""
    parts = [p.strip() for p in prompt.split("|")]
    if len(parts) != n_views:
        raise ConfigError(f"illusion prompt {prompt!r} has {len(parts)} part(s) but there are {n_views} views; "
                          "separate one prompt per view with '|'")
    return parts


def illusion_eps(unet, x: torch.Tensor, t, views: Sequence[View], conds: Sequence[torch.Tensor],
                 uncond: torch.Tensor | Sequence[torch.Tensor], guidance: float, adapters: Sequence[str] | None = None,
                 per_view: bool = False, activate: Callable[[int], None] | None = None):
    """The averaged noise estimate ε = mean_i vᵢ⁻¹(ε_CFG(vᵢ(x), pᵢ)) for latents `x` (B, C, H, W).

    `conds[i]` are the text embeddings (B, tokens, dim) of view i's prompt, `uncond` the negative prompt's.
    With `adapters`, adapter `adapters[i]` is made active for view i (one LoRA per view, joint-style); with
    `activate`, `activate(i)` is called before view i's UNet call (a set of weighted adapters per view), and
    `uncond` may then be one embedding per view; otherwise all views go through the UNet in one batch.
    `per_view` also returns the list of εᵢ.
    """
    n = x.shape[0]
    for v in views:
        if v.square and x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"view {v.name} needs a square image; got latents {x.shape[-2]}x{x.shape[-1]}")
    t = torch.as_tensor(t, device=x.device)
    if adapters is not None:
        from loraforge.models.peft_layers import activate_adapter

        activate = (lambda i: activate_adapter(unet, adapters[i]))  # noqa: E731
    unconds = list(uncond) if isinstance(uncond, (list, tuple)) else [uncond] * len(views)
    if activate is None:
        uncond = unconds[0]
        xs = torch.cat([v.apply(x) for v in views])
        inputs = torch.cat([xs, xs])
        text = torch.cat([uncond.expand(n * len(views), -1, -1), torch.cat(list(conds))])
        tt = t.repeat(2 * len(views)) if t.dim() else t  # one timestep per sample: repeat it per view and half
        out = unet(inputs, tt, encoder_hidden_states=text).sample.float()
        e_uncond, e_cond = out[: n * len(views)], out[n * len(views):]
        guided = (e_uncond + guidance * (e_cond - e_uncond)).split(n)
    else:
        guided = []
        for i, (v, cond, uncond) in enumerate(zip(views, conds, unconds)):
            activate(i)
            xi = v.apply(x)
            out = unet(torch.cat([xi, xi]), t.repeat(2) if t.dim() else t, encoder_hidden_states=torch.cat([uncond.expand(n, -1, -1), cond])).sample
            e_uncond, e_cond = out.float()[:n], out.float()[n:]
            guided.append(e_uncond + guidance * (e_cond - e_uncond))
    eps = [v.inverse(e) for v, e in zip(views, guided)]
    mean = torch.stack(eps).mean(dim=0)
    return (mean, eps) if per_view else mean


def use_adapters(model, pairs: Sequence[tuple[str, float]]) -> None:
    """Make exactly `pairs` ((diffusers adapter name, weight)) active in `model` — a pipeline (UNet and text
    encoders) or one UNet — and every other loaded adapter inactive; no pair is the base alone."""
    from diffusers import DiffusionPipeline

    if isinstance(model, DiffusionPipeline):
        if not pairs:
            model.disable_lora()
            return
        model.enable_lora()
        model.set_adapters([n for n, _ in pairs], adapter_weights=[w for _, w in pairs])
        return
    present = getattr(model, "peft_config", None) or {}
    pairs = [(n, w) for n, w in pairs if n in present]  # a text-encoder-only adapter is not in the UNet
    if not present:
        return
    if not pairs:
        model.disable_adapters()
        return
    model.enable_adapters()
    model.set_adapters([n for n, _ in pairs], weights=[w for _, w in pairs])


def encode_text(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Per-token text embeddings (len(prompts), tokens, dim) from an SD1 pipeline's text encoder."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ConfigError("illusion sampling supports SD1-family bases only; use an SD1 base such as builtin:tiny-sd")
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images from scaled latents."""
    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def initial_latents(pipe, seed: int, height: int | None, width: int | None, batch: int = 1) -> torch.Tensor:
    """Gaussian x_T drawn on CPU from `seed` (the same on every device), scaled by the scheduler's sigma."""
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ConfigError(f"image size {width}x{height} must be a multiple of {scale} for this base")
    shape = (batch, pipe.unet.config.in_channels, height // scale, width // scale)
    x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    return x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)


@torch.no_grad()
def illusion_sample(pipe, prompts: Sequence[str], views: Sequence[str | View], seed: int = 0, steps: int = 30,
                    guidance: float = 7.5, *, height: int | None = None, width: int | None = None,
                    negative_prompt: str = "", eta: float = 0.0, latents: torch.Tensor | None = None,
                    adapters: Sequence[str] | None = None, return_views: bool = False, output: str = "pil",
                    view_adapters: Sequence[Sequence[tuple[str, float]]] | None = None):
    """Sample one visual anagram with a DDIM sampler on an SD1 pipeline.

    `prompts[i]` is what the image should show under `views[i]`. `view_adapters[i]`: the (diffusers adapter
    name, weight) pairs active while view i is denoised and its prompt encoded — what a joint run trained for
    that view — and no other loaded adapter (an empty set is the base alone). Returns the PIL image; with
    `return_views` also the list of per-view images (the image as view i sees it: decode(vᵢ(x₀))).
    `output="latent"` returns the final latents instead of images (for tests and further processing).
    """
    from loraforge.models.pipeline import ddim_scheduler

    views = get_views(views)
    if len(prompts) != len(views):
        raise ConfigError(f"an illusion needs one prompt per view: got {len(prompts)} prompt(s) for "
                          f"{len(views)} view(s) ({', '.join(v.name for v in views)})")
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    scheduler = ddim_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    activate = None
    if view_adapters is not None:
        if len(view_adapters) != len(views):
            raise ConfigError(f"an illusion needs one adapter set per view: got {len(view_adapters)} for "
                              f"{len(views)} view(s)")
        conds, uncond = [], []
        for i, prompt in enumerate(prompts):  # the text encoder's adapters, too, are the view's own
            use_adapters(pipe, view_adapters[i])
            conds.append(encode_text(pipe, [prompt]).to(dtype))
            uncond.append(encode_text(pipe, [negative_prompt]).to(dtype))
        activate = (lambda i: use_adapters(pipe.unet, view_adapters[i]))  # noqa: E731
    else:
        conds = [c[None].to(dtype) for c in encode_text(pipe, prompts)]
        uncond = encode_text(pipe, [negative_prompt])[:1].to(dtype)
    x = (initial_latents(pipe, seed, height, width) if latents is None else latents.float().clone()).to(device)
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    for t in scheduler.timesteps:
        eps = illusion_eps(pipe.unet, x.to(dtype), t, views, conds, uncond, guidance, adapters=adapters,
                           activate=activate)
        x = scheduler.step(eps.float(), t, x.float(), eta=eta, generator=generator if eta > 0 else None).prev_sample
    if output == "latent":
        return x
    image = decode_latents(pipe, x)[0]
    if not return_views:
        return image
    return image, [decode_latents(pipe, v.apply(x))[0] for v in views]


def illusion_grid(images: Sequence, prompts: Sequence[str], views: Sequence[str | View], title: str | None = None):
    """A one-row labelled grid of the per-view images ("vflip: a dog" under each)."""
    from loraforge.render.grid import image_grid

    views = get_views(views)
    labels = [f"{v.name}: {p}" for v, p in zip(views, prompts)]
    return image_grid([list(images)], ["illusion"], labels, title=title)


def render_illusion(registry, base_ref: str, lora_specs: Sequence[str], prompts: Sequence[str],
                    views: Sequence[str], *, seed: int = 0, steps: int = 30, guidance: float = 7.5,
                    size: int | None = None, negative_prompt: str = "", grid: bool = False):
    """For recipe `render` steps: an illusion from a base reference and `REF=W` adapter specs.

    Returns the image, or with `grid` the labelled per-view grid (one column per view).
    """
    from loraforge.render.adapters import load_pipeline_with_adapters

    pipe, _base, _loaded = load_pipeline_with_adapters(registry, base_ref, lora_specs)
    image, per_view = illusion_sample(pipe, prompts, views, seed, steps, guidance, height=size, width=size,
                                      negative_prompt=negative_prompt, return_views=True)
    return illusion_grid(per_view, prompts, views) if grid else image
