"""Textual inversion: new token embeddings learned on an image set, the rest of the model frozen
(Gal et al.; diffusers' textual_inversion example). SD1 learns rows of `text_encoder`; SDXL rows of both
encoders (clip_l and clip_g).

The learned rows are parameters of their own, spliced into the token-embedding output wherever a new token's
id appears (a forward hook), so the base's embedding matrix is never written while training: every other row
stays bit-identical, and AdamW's weight decay touches only the new rows. They are written into the matrix
once, at the end, for the validation grid.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from loraforge.errors import ConfigError, DatasetError
from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest
from loraforge.train.base import TrainConfig
from loraforge.train.trainer import SessionTrainer

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.train.session import Session

# TrainConfig fields that shape a LoRA; textual inversion trains no LoRA and refuses them when set.
LORA_ONLY = ("rank", "alpha", "target_modules", "train_text_encoder")
NO_LORA = "textual inversion trains no LoRA, only the token's vectors (refused when given)"


class TextualInversionConfig(TrainConfig):
    dataset: str = Field(description="Folder of images with .txt captions or metadata.jsonl, or a registry dataset reference.")
    token: str = Field(description="The new placeholder token to learn, e.g. '<sks>'; it must not be in the tokenizer yet.")
    initializer: str = Field(description="A word of one token whose embedding the new vectors start from, e.g. 'dog'.")
    num_vectors: int = Field(1, ge=1, le=64, description=(
        "Vectors learned for the token (diffusers' multi-vector spelling: token, token_1, ...)."))
    template: Optional[str] = Field(None, description=(
        "Prompt for every image with {} where the token goes, e.g. 'a photo of {}' (instead of the captions)."))
    instance_prompt: Optional[str] = Field(None, description="Caption for images that have none; must contain the token.")
    crop: Literal["center", "random"] = Field("center", description="How images are cropped to the square resolution.")
    learning_rate: float = Field(5e-3, gt=0, description="Peak learning rate of AdamW on the new vectors.")
    # TrainConfig's LoRA fields, kept for the shared schema; their help says they are refused here.
    rank: int = Field(8, ge=1, description=f"Not used: {NO_LORA}.")
    alpha: Optional[float] = Field(None, gt=0, description=f"Not used: {NO_LORA}.")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                      description=f"Not used: {NO_LORA}.")
    train_text_encoder: bool = Field(False, description=f"Not used: {NO_LORA}.")

    @model_validator(mode="after")
    def _refuse_lora_options(self) -> "TextualInversionConfig":
        given = [name for name in LORA_ONLY if name in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)} shape a LoRA, and textual inversion trains no LoRA (only the "
                             f"token's embedding vectors): drop {', '.join(given)}")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"template {self.template!r} has no {{}} where the token goes: write e.g. 'a photo of {{}}'")
        return self


class LearnedRows:
    """The new token rows of one text encoder: a trainable [num_vectors, dim] parameter spliced into its
    token-embedding output (ids >= first are the new tokens, added last)."""

    def __init__(self, encoder, tokenizer, token_ids: list[int], init_id: int):
        import torch

        embedding = encoder.get_input_embeddings()
        self.embedding, self.first, self.ids = embedding, token_ids[0], token_ids
        assert token_ids == list(range(token_ids[0], token_ids[0] + len(token_ids)))
        start = embedding.weight.detach()[init_id].float()
        self.rows = torch.nn.Parameter(start.repeat(len(token_ids), 1).clone())
        self.handle = embedding.register_forward_hook(self._splice)

    def _splice(self, _module, args, output):
        ids = args[0]
        new = ids >= self.first
        if not bool(new.any()):
            return output
        rows = self.rows.to(output.device, output.dtype)[(ids - self.first).clamp(min=0)]
        return rows.where(new[..., None], output)  # torch.where as a method: no import in the forward hook

    def write_into_matrix(self) -> None:
        """Stop splicing and put the learned rows into the embedding matrix (the new rows only)."""
        import torch

        self.handle.remove()
        with torch.no_grad():
            self.embedding.weight[self.first:self.first + len(self.ids)] = self.rows.detach().to(self.embedding.weight)


@TRAINERS.register("textual_inversion", reference_url="https://arxiv.org/abs/2208.01618", version="1")
class TextualInversionTrainer(SessionTrainer):
    """Textual inversion: learn a new token's embedding vectors (SD1; SDXL: both encoders) on an image set."""

    config_class = TextualInversionConfig
    method = "textual_inversion"
    families = ("sd1", "sdxl")
    artifact_kind = "embedding"

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.formats.embeddings import Embedding, multi_vector_tokens
        from loraforge.models.text_encoders import base_text_encoders, check_new_token, pipeline_text_encoders
        from loraforge.train.cache import BatchSource
        from loraforge.train.data import batch_indices, prepare_dataset, step_generator
        from loraforge.train.loop import run_loop
        from loraforge.train.model import denoising_loss, encode_prompts, sample_noise

        c, registry, output = session.config, session.registry, session.output
        base_ref = session.base().ref
        tokens = multi_vector_tokens(c.token, c.num_vectors)
        # Refused from the base's tokenizers before anything (the dataset snapshot included) is registered.
        base_encoders = base_text_encoders(session.base(), registry.home)
        check_new_token(tokens, base_encoders, base_ref)
        for component, encoder in base_encoders.items():
            init = encoder.tokenizer.encode(c.initializer, add_special_tokens=False)
            if len(init) != 1:
                raise ConfigError(f"initializer {c.initializer!r} is {len(init)} tokens in the {component} tokenizer "
                                  f"of {base_ref}, not one: choose a word the tokenizer reads as one token")
        if not c.template:  # a folder's captions are checked before its snapshot is registered
            check_captions(folder_captions(c.dataset, c.instance_prompt), c.token)
        data = prepare_dataset(registry, c.dataset, output=output, instance_prompt=c.instance_prompt)
        model = session.load_model()
        pipe = model.pipe
        encoders = pipeline_text_encoders(pipe)
        captions = [c.template.format(c.token) for _ in data.captions] if c.template else list(data.captions)
        check_captions(list(zip(data.images, captions)), c.token)
        learned = {}
        for component, encoder in encoders.items():
            init = encoder.tokenizer.encode(c.initializer, add_special_tokens=False)
            learned[component] = _add_tokens(getattr(pipe, component), encoder.tokenizer, tokens, init[0])
        data = dataclasses.replace(data, captions=captions)
        if model.family == "sd1":  # SDXL's encode_prompt spells multi-vector tokens out itself
            captions = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in captions]
        source = BatchSource(model, data, home=registry.home, resolution=c.resolution, crop=c.crop, seed=c.seed,
                             cached=c.cache_latents, encode_text=False)
        unet = session.forward_denoiser()
        prompts = list(c.validation_prompts) or list(dict.fromkeys(data.captions))[:2]
        session.periodic = [("default", prompts, (1.0,))]
        n_timesteps = model.noise_scheduler.config.num_train_timesteps

        def step_fn(step: int, micro: int):
            idx = batch_indices(len(data), c.batch_size, step, micro, c.seed, c.gradient_accumulation)
            latents, _ = source.batch(idx)
            text = encode_prompts(model, [captions[i] for i in idx], grad=True)
            noise, t = sample_noise(latents, step_generator(c.seed, step, micro), n_timesteps)
            return denoising_loss(model, unet, latents, text, noise, t)

        params = {f"{component}.token_rows": rows.rows for component, rows in learned.items()}
        result = run_loop(title=f"train {self.method} {output}", params=params, step_fn=step_fn,
                          samples_per_step=c.batch_size, **session.loop_kwargs())
        for rows in learned.values():
            rows.write_into_matrix()
        embedding = Embedding(c.token, {component: rows.rows.detach().float().cpu().clone()
                                        for component, rows in learned.items()}, initializer=c.initializer)
        return [finish_embedding(session, embedding, [data.manifest], result.metrics, prompts)]


def folder_captions(source: str, instance_prompt: str | None) -> list[tuple[str, str]]:
    """(image, caption) of a dataset folder as a run would snapshot it; empty for a registry dataset (its
    captions are checked once resolved, and nothing new is registered for it)."""
    from loraforge.reference import Reference
    from loraforge.registry.dataset import complete_captions, scan_dataset

    ref = Reference.parse(source)
    if ref.kind != "path" or not ref.path.is_dir():
        return []
    images, captions = scan_dataset(ref.path)
    rels = [p.relative_to(ref.path).as_posix() for p in images]
    done = complete_captions(dict(captions), rels, instance_prompt, folder=source)
    return [(rel, done[rel]) for rel in rels]


def check_captions(captions: list[tuple[str, str]], token: str) -> None:
    """Refuse a caption without the token: its image would teach the token nothing."""
    for image, caption in captions:
        if token not in caption:
            raise DatasetError(f"caption {caption!r} of {image} does not contain the token {token}: put it in "
                               f"the captions, or give --template 'a photo of {{}}' or --instance-prompt")


def _add_tokens(encoder, tokenizer, tokens: list[str], init_id: int) -> LearnedRows:
    """Add `tokens` to `tokenizer` and rows for them to `encoder` (started from the initializer's row)."""
    import torch

    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConfigError(f"the tokenizer took {added} of the tokens {tokens}; choose another token")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    embedding = encoder.get_input_embeddings()
    if max(ids) >= embedding.weight.shape[0]:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set just below
        embedding = encoder.get_input_embeddings()
    encoder.requires_grad_(False)
    with torch.no_grad():
        embedding.weight[ids] = embedding.weight[init_id].clone()
    return LearnedRows(encoder, tokenizer, list(ids), init_id)


def finish_embedding(session: Session, embedding, datasets: list[Manifest], metrics: dict,
                     prompts: list[str]) -> Manifest:
    """Render the validation grid (the trained token in its prompts), then register the embedding with its
    provenance: the run's config, base and dataset parents, run id; drop the run folder."""
    from loraforge.home import tmp_dir
    from loraforge.registry.importer import embedding_info, register_embedding
    from loraforge.registry.manifest import BaseInfo, Parent, Provenance
    from loraforge.train.validation import save_grid, validation_grid

    c, model = session.config, session.model
    base = model.base
    params = c.model_dump(mode="json", exclude=set(LORA_ONLY))
    parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
    parents += [Parent(ref=d.ref, digest=d.digest, role="dataset") for d in datasets]
    facts = {k: params[k] for k in ("steps", "learning_rate", "lr_scheduler", "batch_size", "gradient_accumulation",
                                    "resolution", "seed", "token", "initializer", "num_vectors") if k in params}
    manifest = Manifest(
        name=session.output, kind="embedding", digest="", files=[], embedding=embedding_info(embedding, "loraforge"),
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
        provenance=Provenance(source=f"train:{session.method}", method=f"train:{session.method}", params=params,
                              parents=parents, recipe=session.recipe, training=facts, run_id=session.run_id,
                              dataset_digest=datasets[0].digest if datasets else None),
        metrics=metrics,
    )
    with tempfile.TemporaryDirectory(dir=tmp_dir(session.registry.home)) as tmp:
        files = list(session._periodic_files.get("default", []))
        if prompts:
            grid = validation_grid(model.pipe, prompts, (1.0,), seed=c.seed, steps=c.validation_steps,
                                   resolution=c.resolution, title=f"{session.output} ({session.method})")
            files.append((save_grid(grid, Path(tmp)), "validation.png"))
        registered = register_embedding(session.registry, embedding, manifest, input_digest=session.input_digest,
                                        extra_files=files)
    shutil.rmtree(session.run_dir, ignore_errors=True)
    shutil.rmtree(session._scratch, ignore_errors=True)
    return registered
