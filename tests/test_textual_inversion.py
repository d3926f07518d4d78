"""Textual inversion: the trainer learns only the new token's rows and lowers the loss; embeddings import and
export in the diffusers, A1111 and SDXL layouts and load in diffusers' own `load_textual_inversion` with the
text-encoder output loraforge's loading gives; they render beside LoRAs and go to the Hub with their token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.formats.embeddings import read_embedding
from loraforge.plugins import TRAINERS
from loraforge.registry import Registry

from cli_helpers import link_builtins, refused, run_cli

RES = 32
TOKEN = "<sks>"
FAST = {"resolution": RES, "validation_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "seed": 0}
PROMPT = f"a photo of {TOKEN} on grass"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ti_home(tmp_path_factory, builtin_folders) -> Path:
    return link_builtins(tmp_path_factory.mktemp("ti-home"), builtin_folders)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four red-striped images (the concept), captioned with the token."""
    folder = tmp_path_factory.mktemp("ti-data")
    for i in range(4):
        arr = np.full((40, 40, 3), 30, np.uint8)
        arr[::4, :, 0] = 230
        arr[1::4, :, 0] = 230
        Image.fromarray(np.roll(arr, i, axis=0)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of {TOKEN}")
    return folder


class SpyTrainer(TRAINERS.get("textual_inversion")):
    """The built-in trainer, keeping the pipeline it trained so a test can read every weight after the run."""

    def run(self, session):
        out = super().run(session)
        type(self).pipe = session.model.pipe
        return out


def train(home: Path, output: str, dataset: Path, trainer=None, **values):
    trainer = trainer or TRAINERS.get("textual_inversion")
    config = trainer.config_class.model_validate({**FAST, "dataset": str(dataset), "token": TOKEN,
                                                  "initializer": "dog", **values})
    return trainer().train(config, registry=Registry(home), output=output, progress=False)


@pytest.fixture(scope="module")
def trained(ti_home, images):
    """A two-vector embedding trained for 60 steps on tiny-sd, and the pipeline it was trained in."""
    (manifest,) = train(ti_home, "sks-ti", images, trainer=SpyTrainer, steps=60, num_vectors=2, learning_rate=0.2)
    return manifest, SpyTrainer.pipe


def fresh_sd(path: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """The text conditioning the pipeline itself computes for `prompt` (multi-vector tokens spelled out by it)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0]


def ours(home: Path, base: str, ref: str):
    from loraforge.render.adapters import load_pipeline_with_adapters

    pipe, _base, _loaded = load_pipeline_with_adapters(Registry(home), base, [ref], device="cpu")
    return pipe


# ---- the trainer ------------------------------------------------------------------------------

def test_training_changes_only_the_new_token_rows(trained, ti_home, tiny_sd_path):
    manifest, pipe = trained
    base = fresh_sd(tiny_sd_path)
    vocab = base.text_encoder.get_input_embeddings().weight.shape[0]
    trained_te = pipe.text_encoder.state_dict()
    for key, value in base.text_encoder.state_dict().items():
        if key.endswith("token_embedding.weight"):
            assert torch.equal(trained_te[key][:vocab], value), "a row of the base vocabulary changed"
            assert trained_te[key].shape[0] == vocab + 2
        else:
            assert torch.equal(trained_te[key], value), key
    for key, value in base.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key
    emb = manifest.embedding
    assert (emb.token, emb.tokens, emb.num_vectors, emb.components, emb.initializer) == (
        TOKEN, [TOKEN, f"{TOKEN}_1"], 2, ["text_encoder"], "dog")
    learned = read_embedding(Registry(ti_home).checkout(manifest) / "learned_embeds.safetensors")[0]
    new_rows = pipe.text_encoder.get_input_embeddings().weight.detach()[vocab:]
    assert torch.equal(learned.vectors["text_encoder"], new_rows.float())
    start = base.text_encoder.get_input_embeddings().weight[base.tokenizer.encode("dog", add_special_tokens=False)[0]]
    assert (new_rows - start).abs().max() > 1e-3  # they moved away from the initializer's row
    assert sorted(f.path for f in manifest.files) == ["learned_embeds.safetensors", "validation.png"]
    listed = Registry(ti_home).list(kind="embedding")
    assert "sks-ti" in [r["name"] for r in listed] and {r["kind"] for r in listed} == {"embedding"}
    assert "rank" not in manifest.provenance.params and manifest.provenance.params["token"] == TOKEN


def test_training_lowers_the_denoising_loss_on_fixed_noise(trained, ti_home, images, tiny_sd_path):
    """The loss on the concept's images with fixed noise and timesteps: learned rows vs the initializer's rows."""
    from loraforge.train.data import image_tensor
    from loraforge.train.model import encode_images, load_training_model

    manifest, pipe = trained
    assert manifest.metrics["loss_first"] is not None and manifest.metrics["loss_last"] is not None
    model = load_training_model(Registry(ti_home), "builtin:tiny-sd", device="cpu")
    model.pipe.text_encoder, model.pipe.tokenizer = pipe.text_encoder, pipe.tokenizer
    weight = pipe.text_encoder.get_input_embeddings().weight
    vocab = weight.shape[0] - 2
    learned = weight[vocab:].detach().clone()
    init = weight[pipe.tokenizer.encode("dog", add_special_tokens=False)[0]].detach().clone()
    pixels = torch.stack([image_tensor(images / f"img{i}.png", RES) for i in range(4)])
    latents = encode_images(model, pixels)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn((8, *latents.shape), generator=g)
    steps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (8, 4), generator=g)
    ids = pipe.tokenizer([pipe.maybe_convert_prompt(f"a photo of {TOKEN}", pipe.tokenizer)] * 4, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids

    def loss(rows) -> float:
        with torch.no_grad():
            weight[vocab:] = rows
            text = pipe.text_encoder(ids)[0]
            total = 0.0
            for n, t in zip(noise, steps):
                noisy = model.noise_scheduler.add_noise(latents, n, t)
                pred = model.unet(noisy, t, encoder_hidden_states=text).sample
                total += float(torch.nn.functional.mse_loss(pred, n))
        return total / len(noise)

    before, after = loss(init.repeat(2, 1)), loss(learned)
    weight.data[vocab:] = learned
    # measured 1.107 -> 1.088: tiny-sd's UNet is random, so text moves its prediction only a little
    assert after < before * 0.99, (before, after)


# ---- formats: diffusers' own loader is the oracle ----------------------------------------------

@pytest.mark.parametrize("fmt, name, token", [("diffusers", "learned_embeds.safetensors", None),
                                              ("a1111", "sks.pt", None),
                                              ("a1111", "sks.safetensors", TOKEN)])
def test_exports_load_in_diffusers_with_the_text_encoder_output_of_loraforge(trained, ti_home, tiny_sd_path,
                                                                              tmp_path, fmt, name, token):
    manifest, _pipe = trained
    out = tmp_path / name
    run_cli(ti_home, "registry", "export", manifest.ref, "--format", fmt, "-o", str(out))
    theirs = fresh_sd(tiny_sd_path)
    theirs.load_textual_inversion(str(out), token=token)  # an emb_params file names no token: the user gives it
    expected = prompt_embeds(ours(ti_home, "builtin:tiny-sd", manifest.ref))
    assert torch.equal(prompt_embeds(theirs), expected)
    base = prompt_embeds(fresh_sd(tiny_sd_path), PROMPT.replace(TOKEN, "dog"))
    assert (expected - base).abs().max() > 1e-4  # the token means something of its own


def test_a1111_pt_import_round_trip(ti_home, tmp_path):
    rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    source = tmp_path / "whatever.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "<mychar>", "step": 1200,
                "sd_checkpoint": "abc123", "sd_checkpoint_name": "model"}, source)
    result = run_cli(ti_home, "registry", "import", str(source), "--name", "mychar", "--base", "builtin:tiny-sd", "--json")
    manifest = json.loads(result.output)
    assert manifest["kind"] == "embedding"
    assert (manifest["embedding"]["token"], manifest["embedding"]["num_vectors"], manifest["embedding"]["format"]) == (
        "<mychar>", 3, "a1111")
    out = tmp_path / "back.pt"
    run_cli(ti_home, "registry", "export", "mychar", "--for", "a1111", "-o", str(out))
    back = torch.load(out, weights_only=True)
    assert back["name"] == "<mychar>" and torch.equal(back["string_to_param"]["*"], rows)
    shown = run_cli(ti_home, "registry", "show", "mychar").output
    assert "token <mychar> (3 vectors on text_encoder" in shown


def test_an_embedding_file_that_pickles_code_is_refused(ti_home, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f, protocol=2)
    line = refused(run_cli(ti_home, "registry", "import", str(bad), "--name", "evil", "--kind", "embedding", ok=False))
    assert "refusing to unpickle" in line


# ---- SDXL: both encoders ------------------------------------------------------------------------

def test_sdxl_learns_clip_l_and_clip_g_rows_and_both_load(ti_home, images, tiny_sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    (manifest,) = train(ti_home, "sks-xl", images, base="builtin:tiny-sdxl", steps=3, num_vectors=2)
    assert manifest.embedding.components == ["text_encoder", "text_encoder_2"]
    assert manifest.embedding.dims == {"text_encoder": 32, "text_encoder_2": 32}
    out = tmp_path / "xl.safetensors"
    run_cli(ti_home, "registry", "export", manifest.ref, "--for", "diffusers", "-o", str(out))
    state = load_file(out)
    assert sorted(state) == ["clip_g", "clip_l"]
    theirs = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
    theirs.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    mine = ours(ti_home, "builtin:tiny-sdxl", manifest.ref)
    for tokenizer in (mine.tokenizer, mine.tokenizer_2):
        assert {TOKEN, f"{TOKEN}_1"} <= set(tokenizer.get_vocab())
    assert sorted(state) == ["clip_g", "clip_l"] and state["clip_l"].shape == state["clip_g"].shape == (2, 32)
    assert not torch.equal(state["clip_l"], state["clip_g"])  # each encoder learned its own rows
    with torch.no_grad():
        a = mine.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        b = theirs.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # per-token embeddings and pooled text


# ---- refusals -----------------------------------------------------------------------------------

def _artifacts(home: Path) -> list:
    return [(r["name"], r["version"]) for r in Registry(home).list()]


def test_a_token_the_tokenizer_has_is_refused_in_one_line_and_nothing_is_registered(ti_home, images, tmp_path):
    before = _artifacts(ti_home)
    line = refused(run_cli(ti_home, "train", "textual_inversion", "--name", "dog-ti", "--dataset", str(images),
                           "--token", "dog", "--initializer", "cat", "--steps", "1", "--resolution", "32", ok=False))
    assert line == "Error: token 'dog' is already in the tokenizer of builtin:tiny-sd: choose another"
    path = tmp_path / "learned_embeds.safetensors"
    from loraforge.formats.embeddings import Embedding, write_embedding

    write_embedding(Embedding("dog", {"text_encoder": torch.zeros(1, 32)}), path)
    line = refused(run_cli(ti_home, "registry", "import", str(path), "--name", "dog-emb", "--base", "builtin:tiny-sd",
                           ok=False))
    assert line == "Error: token 'dog' is already in the tokenizer of builtin:tiny-sd: choose another"
    assert _artifacts(ti_home) == before


@pytest.mark.parametrize("args, message", [
    (["--initializer", "a photo"], "initializer 'a photo' is 2 tokens in the text_encoder tokenizer of builtin:tiny-sd"),
    (["--initializer", "dog", "--rank", "4"], "rank shape a LoRA, and textual inversion trains no LoRA"),
    (["--initializer", "dog", "--template", "a photo"], "template 'a photo' has no {} where the token goes"),
])
def test_bad_options_are_refused_in_one_line(ti_home, images, args, message):
    before = _artifacts(ti_home)
    line = refused(run_cli(ti_home, "train", "textual_inversion", "--name", "bad-ti", "--dataset", str(images),
                           "--token", "<new>", "--steps", "1", "--resolution", "32", *args, ok=False))
    assert message in line
    assert _artifacts(ti_home) == before


# ---- use: generate with a LoRA, refusals of weights and LoRA algebra, the Hub ------------------

def test_generate_with_a_lora_a_slider_and_an_embedding_in_one_render(trained, ti_home, adapter_file, tmp_path,
                                                                      tiny_sd_path):
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    manifest, _pipe = trained
    run_cli(ti_home, "registry", "import", str(adapter_file), "--name", "style", "--base", "builtin:tiny-sd")
    slider = tmp_path / "size.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=8), slider, "kohya")
    run_cli(ti_home, "registry", "import", str(slider), "--name", "size", "--kind", "slider", "--concept", "size")
    common = ["generate", "--base", "builtin:tiny-sd", "--prompt", PROMPT, "--steps", "2", "--size", "32",
              "--lora", "style=0.8", "--lora", "size=1.5"]
    both, lora_only = tmp_path / "both.png", tmp_path / "lora.png"
    run_cli(ti_home, *common, "--lora", manifest.ref, "-o", str(both))
    run_cli(ti_home, *common, "-o", str(lora_only))
    a, b = np.asarray(Image.open(both), np.float32), np.asarray(Image.open(lora_only), np.float32)
    assert a.shape == (32, 32, 3) and np.abs(a - b).mean() > 0.5  # the token is read as the learned vectors
    line = refused(run_cli(ti_home, *common, "--lora", f"{manifest.ref}=0.5", "-o", str(tmp_path / "x.png"), ok=False))
    assert "has no weight" in line and "0.5" in line


def test_lora_algebra_refuses_an_embedding_in_one_line(trained, ti_home):
    manifest, _pipe = trained
    line = refused(run_cli(ti_home, "lora", "fuse", "builtin:tiny-sd", manifest.ref, "--name", "fused", ok=False))
    assert "is an embedding (token <sks>): LoRA algebra cannot fold a token embedding" in line


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub the real client talks to (as in test_hub.py)."""
    import huggingface_hub.constants as hf_constants

    import loraforge.hub.client as client
    from hub_server import HubServer

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "hf_testTOKENdoNotLeak1234567890")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(client, "RETRY_BASE_WAIT", 0.01)
        yield server


def other_home(tmp_path: Path, ti_home: Path) -> Path:
    other = tmp_path / "home2"
    (other / "models").mkdir(parents=True)
    (other / "models" / "builtin").symlink_to(ti_home / "models" / "builtin", target_is_directory=True)
    return other


def test_hub_push_names_the_token_and_pull_gives_the_same_embedding(trained, ti_home, tmp_path, hub):
    from huggingface_hub import hf_hub_download

    manifest, _pipe = trained
    run_cli(ti_home, "hub", "push", manifest.ref, "--repo", "me/sks-ti")
    other = other_home(tmp_path, ti_home)
    run_cli(other, "hub", "pull", "me/sks-ti")
    card = Path(hf_hub_download("me/sks-ti", "README.md", endpoint=hub.endpoint, cache_dir=tmp_path / "dl")).read_text()
    pulled = Registry(other).resolve("sks-ti")
    assert pulled.kind == "embedding" and pulled.digest == manifest.digest
    assert pulled.embedding.token == TOKEN
    assert "instance_prompt: <sks>" in card and "textual_inversion" in card
    assert f"Put `{TOKEN}` in the prompt" in card and 'load_textual_inversion("me/sks-ti"' in card


# ---- recipes: a train step makes an embedding, a render step uses it beside a LoRA --------------

TI_RECIPE = """\
name: ti
base: builtin:tiny-sd
steps:
  concept:
    train: {method: textual_inversion, dataset: ./data, token: "<sks>", initializer: dog, steps: 2, resolution: 32,
            validation_steps: 1}
  style:
    synthetic: {kind: lora, seed: 1, rank: 2}
  grid:
    render: {adapters: [{ref: "${style}", weight: 0.8}, {ref: "${concept}"}], prompts: ["a photo of <sks>"],
             seeds: [1], steps: 2, size: 32}
"""


def test_a_recipe_trains_an_embedding_and_renders_it_beside_a_lora_and_stack_refuses_it(ti_home, images, tmp_path):
    import shutil

    shutil.copytree(images, tmp_path / "data")
    recipe = tmp_path / "ti.yaml"
    recipe.write_text(TI_RECIPE)
    run_cli(ti_home, "recipe", "apply", str(recipe))
    registry = Registry(ti_home)
    assert registry.resolve("ti-concept").kind == "embedding"
    grid = registry.resolve("ti-grid")
    assert [(p.ref, p.role) for p in grid.provenance.parents][1:] == [("ti-style:1", "adapter"),
                                                                       ("ti-concept:1", "adapter")]
    stacked = recipe.with_name("stack.yaml")
    stacked.write_text(TI_RECIPE.split("  grid:")[0] + '  both:\n    stack: {adapters: [{ref: "${style}"}, '
                       '{ref: "${concept}"}]}\n')
    before = _artifacts(ti_home)
    for command in ("validate", "apply"):  # refused when planned, before anything runs
        line = refused(run_cli(ti_home, "recipe", command, str(stacked), ok=False))
        assert line.endswith("steps.both.stack.adapters.1.ref: ${concept} makes an embedding, which LoRA algebra "
                             "cannot fold into a LoRA: combine LoRAs and sliders here, and give the embedding to a "
                             "render step"), line
    named = recipe.with_name("named-stack.yaml")  # the same for a registry embedding named in the recipe
    named.write_text(TI_RECIPE.split("  grid:")[0] + '  both:\n    stack: {adapters: [{ref: "${style}"}, '
                     '{ref: ti-concept}]}\n')
    line = refused(run_cli(ti_home, "recipe", "apply", str(named), ok=False))
    assert line.endswith("steps.both.stack.adapters.1.ref: ti-concept is an embedding, which LoRA algebra cannot "
                         "fold into a LoRA: combine LoRAs and sliders here, and give the embedding to a render step"), line
    assert _artifacts(ti_home) == before


# ---- more formats and refusals -------------------------------------------------------------------

def _write_file(kind: str, path: Path, rows: torch.Tensor) -> None:
    from safetensors.torch import save_file

    if kind == "diffusers-bin":
        torch.save({"<cat-toy>": rows}, path)
    elif kind == "diffusers-1d":
        save_file({"<cat-toy>": rows[0].contiguous()}, str(path))
    elif kind == "a1111-safetensors":
        save_file({"emb_params": rows}, str(path))
    else:  # sdxl
        save_file({"clip_l": rows, "clip_g": rows.flip(0).contiguous()}, str(path))


@pytest.mark.parametrize("kind, file, token, want_token, want_vectors", [
    ("diffusers-bin", "learned_embeds.bin", None, "<cat-toy>", 2),
    ("diffusers-1d", "learned_embeds.safetensors", None, "<cat-toy>", 1),
    ("a1111-safetensors", "charturner.safetensors", None, "charturner", 2),
    ("a1111-safetensors", "x.safetensors", "<ct>", "<ct>", 2),
    ("sdxl", "xl.safetensors", "<xl>", "<xl>", 2),
])
def test_embedding_files_are_detected_with_their_token(ti_home, tmp_path, kind, file, token, want_token, want_vectors):
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    path = tmp_path / file
    _write_file(kind, path, rows)
    name = f"e-{kind}-{token is not None}"
    args = ["--token", token] if token else []
    result = run_cli(ti_home, "registry", "import", str(path), "--name", name, "--json", *args)
    info = json.loads(result.output)["embedding"]
    assert (info["token"], info["num_vectors"]) == (want_token, want_vectors)
    assert info["components"] == (["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"])
    back = read_embedding(Registry(ti_home).checkout(Registry(ti_home).resolve(name)) / "learned_embeds.safetensors")[0]
    assert torch.equal(back.vectors["text_encoder"], rows[:want_vectors])


def test_an_sdxl_embedding_is_refused_on_an_sd1_base(ti_home, tmp_path):
    path = tmp_path / "xl.safetensors"
    _write_file("sdxl", path, torch.zeros(1, 32))
    line = refused(run_cli(ti_home, "registry", "import", str(path), "--name", "xl-on-sd1", "--base",
                           "builtin:tiny-sd", ok=False))
    assert line == ("Error: embedding 'xl' is a sdxl embedding (text_encoder, text_encoder_2) but builtin:tiny-sd "
                    "is sd1 (one text encoder): use it with a base of its family")


def test_template_replaces_captions_and_a_caption_without_the_token_is_refused(ti_home, images, tmp_path):
    (manifest,) = train(ti_home, "templated", images, steps=1, template="a striped photo of {}")
    assert manifest.provenance.params["template"] == "a striped photo of {}"
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        (plain / f"img{i}.png").write_bytes((images / f"img{i}.png").read_bytes())
        (plain / f"img{i}.txt").write_text("a striped photo")
    before = _artifacts(ti_home)
    line = refused(run_cli(ti_home, "train", "textual_inversion", "--name", "no-token", "--dataset", str(plain),
                           "--token", TOKEN, "--initializer", "dog", "--steps", "1", "--resolution", "32", ok=False))
    assert line == ("Error: caption 'a striped photo' of img0.png does not contain the token <sks>: put it in the "
                    "captions, or give --template 'a photo of {}' or --instance-prompt")
    assert _artifacts(ti_home) == before


@pytest.mark.parametrize("args, message", [
    (["--for", "peft"], "Error: PEFT (PeftModel.from_pretrained, one folder per model) loads adapters of modules, not "
                        "token embeddings; use --for with one of comfyui, a1111, kohya, diffusers"),
    (["--format", "kohya"], "Error: xl-export:1 is an embedding: export it with --format diffusers or a1111 (or "
                            "--for diffusers|a1111|comfyui), not kohya"),
    (["--format", "a1111"], "Error: an SDXL embedding is shared as clip_l/clip_g safetensors, not an A1111 .pt: "
                            "write out.safetensors"),
    (["--with-manifest"], "Error: --with-manifest writes an adapter file's loraforge header; xl-export:1 is an "
                          "embedding, written in the layout its loaders read (its token in the header): drop "
                          "--with-manifest"),
])
def test_exports_an_embedding_cannot_take_are_refused_in_one_line(ti_home, tmp_path, args, message):
    path = tmp_path / "xl.safetensors"
    _write_file("sdxl", path, torch.zeros(1, 32))
    if not Registry(ti_home).exists("xl-export"):
        run_cli(ti_home, "registry", "import", str(path), "--name", "xl-export")
    out = tmp_path / "out.pt"
    assert refused(run_cli(ti_home, "registry", "export", "xl-export", *args, "-o", str(out), ok=False)) == message
    assert not out.exists()


def test_a_textual_inversion_repo_made_elsewhere_pulls_as_an_embedding(ti_home, tmp_path, hub):
    """A repo as diffusers' textual_inversion example and sd-concepts-library publish it: learned_embeds.bin (a
    pickle, read weights-only) and token_identifier.txt."""
    import io

    rows = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    buffer = io.BytesIO()
    torch.save({"<cat-toy>": rows}, buffer)
    hub.state.seed("concepts/cat-toy", {"learned_embeds.bin": buffer.getvalue(), "token_identifier.txt": b"<cat-toy>\n"})
    other = other_home(tmp_path, ti_home)
    run_cli(other, "hub", "pull", "concepts/cat-toy")
    pulled = Registry(other).resolve("cat-toy")
    assert (pulled.kind, pulled.embedding.token, pulled.provenance.params["file"]) == (
        "embedding", "<cat-toy>", "learned_embeds.bin")
    pipe = ours(other, "builtin:tiny-sd", "cat-toy")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<cat-toy>")],
                       rows[0])


def test_a_recipe_renders_a_registry_embedding_named_in_its_adapters(ti_home, tmp_path):
    from loraforge.formats.embeddings import Embedding, write_embedding

    path = tmp_path / "learned_embeds.safetensors"
    write_embedding(Embedding("<rnd>", {"text_encoder": torch.randn(1, 32, generator=torch.Generator().manual_seed(5))}),
                    path)
    run_cli(ti_home, "registry", "import", str(path), "--name", "rnd-emb")
    recipe = tmp_path / "named.yaml"
    recipe.write_text("name: named\nbase: builtin:tiny-sd\nsteps:\n  grid:\n    render: {adapters: [{ref: rnd-emb}], "
                      "prompts: [\"a photo of <rnd>\"], seeds: [1], steps: 2, size: 32}\n"
                      "  imported:\n    import: {path: ./learned_embeds.safetensors, kind: embedding, token: <imp>}\n")
    run_cli(ti_home, "recipe", "apply", str(recipe))
    grid = Registry(ti_home).resolve("named-grid")
    assert [(p.ref, p.role) for p in grid.provenance.parents][1:] == [("rnd-emb:1", "adapter")]
    assert Registry(ti_home).resolve("named-imported").embedding.token == "<imp>"  # a recipe's --token


class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_vectors(ti_home, images, monkeypatch):
    import loraforge.train.loop as loop_module

    values = dict(steps=6, checkpoint_every=2, validation_prompts=[PROMPT])
    (whole,) = train(ti_home, "ti-whole", images, **values)
    real_loop = loop_module.run_loop

    def dying_loop(**kwargs):
        def on_step(step):
            if step == 5:  # killed after step 5: the newest checkpoint is step 4
                raise Killed()
        return real_loop(**{**kwargs, "on_step": on_step})

    monkeypatch.setattr(loop_module, "run_loop", dying_loop)
    with pytest.raises(Killed):
        train(ti_home, "ti-resumed", images, **values)
    monkeypatch.setattr(loop_module, "run_loop", real_loop)
    trainer = TRAINERS.get("textual_inversion")
    config = trainer.config_class.model_validate({**FAST, "dataset": str(images), "token": TOKEN, "initializer": "dog",
                                                  **values})
    (resumed,) = trainer().train(config, registry=Registry(ti_home), output="ti-resumed", resume=True, progress=False)
    assert resumed.metrics["resumed_from_step"] == 4
    registry = Registry(ti_home)
    a, b = (read_embedding(registry.checkout(m) / "learned_embeds.safetensors")[0] for m in (whole, resumed))
    assert torch.equal(a.vectors["text_encoder"], b.vectors["text_encoder"])
    assert resumed.metrics["loss_last"] == whole.metrics["loss_last"]
