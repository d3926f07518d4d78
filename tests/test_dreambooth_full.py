"""Full DreamBooth: a checkpoint whose UNet learnt the subject, whose VAE (and text encoder, unless trained) are the
base's bit for bit, with lineage to base and data; it resumes exactly, extracts into a LoRA and serves as a base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from loraforge.cli import cli
from loraforge.errors import ArtifactNotFound
from loraforge.plugins import TRAINERS
from loraforge.registry import Registry
from tests.cli_helpers import link_builtins

RES = 32  # pixels; latents are 4×4
FAST = {"resolution": RES, "validation_steps": 2, "learning_rate": 2e-4, "batch_size": 2}
SUBJECT = "a photo of sks dog"
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory, builtin_folders) -> Path:
    """One home for the module, so the run trained once is inspected by several tests."""
    return link_builtins(tmp_path_factory.mktemp("dreambooth-home"), builtin_folders)


def checks(folder: Path, n: int = 4) -> Path:
    """`n` images of blue checks on dark grey (shifted by a pixel each), no captions: the instance prompt is used."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:40, :48]
    for i in range(n):
        arr = np.full((40, 48, 3), 30, np.uint8)
        arr[((yy // 4 + xx // 4) % 2) == 0, 2] = 230
        Image.fromarray(np.roll(arr, i, axis=1)).save(folder / f"img{i}.png")
    return folder


def train(home: Path, output: str, **values):
    trainer = TRAINERS.get("dreambooth")
    config = trainer.config_class.model_validate({**FAST, **values})
    return trainer().train(config, registry=Registry(home), output=output, progress=False)


def cli_run(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS[component]))


@torch.no_grad()
def subject_loss(pipe, folder: Path, prompt: str, seed: int = 123, draws: int = 6) -> float:
    """Mean noise-prediction loss of `pipe` (a diffusers pipeline) on the folder's images at fixed noise and steps."""
    from diffusers import DDPMScheduler

    from loraforge.train.data import image_tensor

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([image_tensor(p, RES) for p in sorted(folder.glob("*.png"))])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0].expand(len(latents), -1, -1)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(latents),), generator=g)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / draws


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    return checks(tmp_path_factory.mktemp("subject") / "sks")


@pytest.fixture(scope="module")
def tuned(shared_home, subject):
    """One run with prior preservation on two class images the base generates: (manifest, checked-out folder)."""
    [m] = train(shared_home, "sks-db", dataset=str(subject), instance_prompt=SUBJECT, steps=30,
                prior_preservation=True, class_prompt="a photo of dog", num_class_images=2, class_generation_steps=2,
                prior_loss_weight=0.5)
    return m, Registry(shared_home).checkout(m)


# ---- the checkpoint -----------------------------------------------------------------------------

def test_checkpoint_is_a_diffusers_folder_with_lineage_to_base_and_data(shared_home, tuned):
    m, folder = tuned
    assert m.kind == "checkpoint" and m.layout == "diffusers" and m.provenance.method == "train:dreambooth"
    paths = {f.path for f in m.files}
    assert set(WEIGHTS.values()) | {"model_index.json", "validation.png"} <= paths
    assert not any(p.endswith((".bin", ".pt", ".ckpt")) for p in paths)  # safetensors only
    assert m.base.ref == "builtin:tiny-sd" and m.base.family == "sd1"
    registry = Registry(shared_home)
    roles = [p.role for p in m.provenance.parents]
    assert roles == ["base", "dataset", "dataset"]  # the instance images, then the generated class images
    class_set = registry.resolve(m.provenance.parents[2].ref)
    assert class_set.dataset.num_images == 2 and set(class_set.dataset.captions.values()) == {"a photo of dog"}
    assert m.provenance.dataset_digest == m.provenance.parents[1].digest
    tree = json.loads(cli_run(shared_home, "registry", "lineage", m.ref, "--json").output)
    text = json.dumps(tree)
    assert "builtin:tiny-sd" in text and m.provenance.parents[1].ref in text
    assert Image.open(folder / "validation.png").width >= 128
    assert not any((shared_home / "runs").glob("*/step-*")), "a finished run leaves no checkpoints behind"


def test_unet_learns_the_subject_and_vae_and_text_encoder_stay_bit_identical(tuned, tiny_sd_path, subject):
    from diffusers import StableDiffusionPipeline

    m, folder = tuned
    assert m.metrics["loss_first"] is not None and m.metrics["loss_last"] is not None
    for component in ("vae", "text_encoder"):
        base, mine = weights(tiny_sd_path, component), weights(folder, component)
        assert base.keys() == mine.keys()
        assert all(torch.equal(base[k], mine[k]) for k in base), component
    base, mine = weights(tiny_sd_path, "unet"), weights(folder, "unet")
    changed = [k for k in base if not torch.equal(base[k], mine[k])]
    assert len(changed) > 0.9 * len(base)  # every weight trains, not a few adapted layers

    before = subject_loss(StableDiffusionPipeline.from_pretrained(tiny_sd_path), subject, SUBJECT)
    after = subject_loss(StableDiffusionPipeline.from_pretrained(folder), subject, SUBJECT)
    print(f"subject loss under the instance prompt: base {before:.4f}, tuned {after:.4f}")
    assert after < 0.85 * before, (before, after)


def test_train_text_encoder_changes_it_and_still_not_the_vae(shared_home, tiny_sd_path, subject):
    [m] = train(shared_home, "sks-db-te", dataset=str(subject), instance_prompt=SUBJECT, steps=3,
                train_text_encoder=True, validation_prompts=[], validation_every=2)
    folder = Registry(shared_home).checkout(m)
    base, mine = weights(tiny_sd_path, "text_encoder"), weights(folder, "text_encoder")
    assert any(not torch.equal(base[k], mine[k]) for k in base)
    base, mine = weights(tiny_sd_path, "vae"), weights(folder, "vae")
    assert all(torch.equal(base[k], mine[k]) for k in base)
    # The instance prompt is the default validation prompt, rendered at the end and every validation_every steps.
    assert {"validation.png", "validation/step-00000002.png"} <= {f.path for f in m.files}


def test_save_dtype_fp16_writes_half_weights(shared_home, subject):
    [m] = train(shared_home, "sks-db-half", dataset=str(subject), instance_prompt=SUBJECT, steps=1, save_dtype="fp16")
    tensors = weights(Registry(shared_home).checkout(m), "unet")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert m.provenance.training["dtype"] == "float16"


def test_same_seed_and_data_give_the_same_checkpoint_anywhere(tmp_path, tiny_sd_path):
    """The digest depends on the training only: no path of the machine (the base's, the home's) is in the files."""
    digests = []
    for where in ("one", "elsewhere/two"):
        home = link_builtins(tmp_path / where / "home", {"tiny-sd": tiny_sd_path})
        [m] = train(home, "same", dataset=str(checks(tmp_path / where / "d")), instance_prompt=SUBJECT, steps=1)
        folder = Registry(home).checkout(m)
        for config in folder.rglob("*.json"):
            assert str(tmp_path) not in config.read_text() and "_name_or_path" not in config.read_text(), config
        digests.append(m.digest)
    assert digests[0] == digests[1]


# ---- memory options -----------------------------------------------------------------------------

def test_gradient_checkpointing_recomputes_and_trains_the_same_weights(home, tmp_path, monkeypatch):
    import torch.utils.checkpoint
    import transformers.modeling_utils

    data = checks(tmp_path / "d")
    values = dict(dataset=str(data), instance_prompt=SUBJECT, steps=2, train_text_encoder=True, validation_prompts=[])
    [plain] = train(home, "plain", **values)
    calls = {"unet": 0, "text_encoder": 0}

    def counting(component, real):
        def checkpoint(*args, **kwargs):
            calls[component] += 1
            return real(*args, **kwargs)
        return checkpoint

    # What diffusers' UNet blocks call at each step, and what transformers binds when checkpointing is enabled.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting("unet", torch.utils.checkpoint.checkpoint))
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        counting("text_encoder", transformers.modeling_utils.checkpoint))
    [recomputed] = train(home, "recomputed", gradient_checkpointing=True, **values)
    assert calls["unet"] and calls["text_encoder"], calls
    for component in ("unet", "text_encoder"):
        a, b = (weights(Registry(home).checkout(m), component) for m in (plain, recomputed))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), component


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("flags, named", [(["--mixed-precision", "bf16"], "mixed_precision bf16 needs a CUDA GPU"),
                                          (["--use-8bit-adam"], "use_8bit_adam needs a CUDA GPU")])
def test_cuda_memory_options_are_refused_on_cpu_in_one_line(home, tmp_path, flags, named):
    result = cli_run(home, "train", "dreambooth", "--name", "db", "--dataset", str(checks(tmp_path / "d")),
                     "--instance-prompt", SUBJECT, "--steps", "1", *flags)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and named in lines[0], result.output
    assert Registry(home).list() == []


# ---- resume and failures ------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_weights(home, tmp_path, monkeypatch):
    import loraforge.train.loop as loop_module

    data = checks(tmp_path / "d")
    values = dict(dataset=str(data), instance_prompt=SUBJECT, steps=5, checkpoint_every=2, validation_prompts=[])
    [whole] = train(home, "whole", **values)
    real_loop = loop_module.run_loop

    def dying_loop(**kwargs):
        def on_step(step):
            if step == 3:  # killed after step 3: the newest checkpoint is step 2
                raise Killed()
        return real_loop(**{**kwargs, "on_step": on_step})

    monkeypatch.setattr(loop_module, "run_loop", dying_loop)
    with pytest.raises(Killed):
        train(home, "resumed", **values)
    monkeypatch.setattr(loop_module, "run_loop", real_loop)
    assert [p.name for p in (home / "runs").glob("*/step-*")] == ["step-00000002"]
    with pytest.raises(ArtifactNotFound):
        Registry(home).resolve("resumed")  # a killed run registers nothing
    trainer = TRAINERS.get("dreambooth")
    config = trainer.config_class.model_validate({**FAST, **values})
    [resumed] = trainer().train(config, registry=Registry(home), output="resumed", resume=True, progress=False)
    assert resumed.metrics["resumed_from_step"] == 2
    a, b = (weights(Registry(home).checkout(m), "unet") for m in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["loss_last"] == whole.metrics["loss_last"]


def test_failed_save_registers_nothing(home, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        train(home, "broken", dataset=str(checks(tmp_path / "d")), instance_prompt=SUBJECT, steps=1,
              validation_prompts=[])
    assert [row["kind"] for row in Registry(home).list()] == ["dataset"]  # the snapshot only, as any trainer leaves it


# ---- CLI --------------------------------------------------------------------------------------------

def test_help_lists_the_options_and_lora_options_are_refused_in_one_line(home, tmp_path):
    result = CliRunner().invoke(cli, ["train", "dreambooth", "--help"])
    assert result.exit_code == 0
    for name in TRAINERS.get("dreambooth").config_class.model_fields:
        assert "--" + name.replace("_", "-") in result.output, name
    assert "Also fine-tune the text encoders' own weights" in result.output
    assert "dreambooth" in CliRunner().invoke(cli, ["train", "--help"]).output

    data = checks(tmp_path / "d")
    for flags, named in ((["--rank", "4"], "rank=4"), (["--target-modules", "to_q"], "target_modules=['to_q']")):
        result = cli_run(home, "train", "dreambooth", "--name", "db", "--dataset", str(data), "--instance-prompt",
                         SUBJECT, "--steps", "1", *flags)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert named in lines[0] and "dreambooth_lora" in lines[0]
    assert Registry(home).list() == []


# ---- from the checkpoint: a LoRA, and images ------------------------------------------------------------

# The time embedding's two Linear layers: `lora extract` once skipped them with every key named like an embedding.
TIME_EMBEDDING = {"time_embedding.linear_1.weight", "time_embedding.linear_2.weight"}


def linear_weights(unet: dict[str, torch.Tensor]) -> set[str]:
    """The UNet's 2-D weights: its linear layers (convolutions are extracted only with --conv)."""
    return {k for k, w in unet.items() if k.endswith(".weight") and w.ndim == 2}


def extracted_unet_modules(home: Path, name: str) -> set[str]:
    from loraforge.formats import read_adapter

    state, _fmt, _meta = read_adapter(Registry(home).primary_file(Registry(home).resolve(name)))
    return {f"{module}.weight" for module in state.component("unet")}


def test_lora_extract_from_the_checkpoint_reproduces_the_tuned_unet(shared_home, tuned, tiny_sd_path, tmp_path):
    """The extracted LoRA, loaded into the base by diffusers and fused, gives the tuned weights up to the error of
    the best rank-r approximation of each ΔW (Eckart–Young, from torch's SVD); at full rank, exactly."""
    from diffusers import StableDiffusionPipeline

    m, folder = tuned
    tuned_w, base_w = weights(folder, "unet"), weights(tiny_sd_path, "unet")
    for rank, name in ((4, "sks-lora"), (128, "sks-lora-full")):
        result = cli_run(shared_home, "lora", "extract", m.ref, "--base", "builtin:tiny-sd", "--rank", str(rank),
                         "--name", name)
        assert result.exit_code == 0, result.output
        out = tmp_path / name
        assert cli_run(shared_home, "registry", "export", name, "--for", "diffusers", "-o", str(out)).exit_code == 0
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        pipe.load_lora_weights(str(out))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = pipe.unet.state_dict()
        extracted = extracted_unet_modules(shared_home, name)
        assert extracted == linear_weights(tuned_w)  # every changed linear layer, the time embedding's included
        assert TIME_EMBEDDING <= extracted
        err = ref = best = 0.0
        n_modules = 0
        for key in extracted:
            w = tuned_w[key]
            delta = w - base_w[key]
            n_modules += 1
            err += float(((fused[key] - w) ** 2).sum())
            ref += float((delta ** 2).sum())
            s = torch.linalg.svdvals(delta.double())
            best += float((s[rank:] ** 2).sum())
        assert n_modules > 50
        rel, optimal = (err / ref) ** 0.5, (best / ref) ** 0.5
        print(f"rank {rank}: relative error of ΔW {rel:.4f} (optimal {optimal:.4f})")
        assert rel <= optimal + 1e-3, (rank, rel, optimal)
        if rank == 128:  # the full rank of every layer: exact
            assert rel < 1e-3


def test_checkpoint_serves_as_base_of_generate(shared_home, tuned, tmp_path):
    m, _ = tuned

    def image(base: str) -> np.ndarray:
        out = tmp_path / f"{base.replace(':', '-')}.png"
        result = cli_run(shared_home, "generate", "--base", base, "--prompt", SUBJECT, "--seed", "1", "--steps", "3",
                         "--size", str(RES), "-o", str(out))
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(out), dtype=np.float32)

    assert np.abs(image(m.ref) - image("builtin:tiny-sd")).mean() > 1.0


def test_checkpoint_serves_as_base_of_a_lora_run(shared_home, tuned, subject):
    m, _ = tuned
    result = cli_run(shared_home, "train", "lora", "--name", "on-db", "--base", m.ref, "--dataset", str(subject),
                     "--instance-prompt", SUBJECT, "--steps", "1", "--resolution", str(RES), "--rank", "2",
                     "--validation-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    [lora] = json.loads(result.output)
    assert lora["base"]["ref"] == m.ref and lora["base"]["digest"] == m.digest


# ---- SDXL --------------------------------------------------------------------------------------------

def test_sdxl_fine_tune_changes_the_unet_only(shared_home, tiny_sdxl_path, subject):
    [m] = train(shared_home, "sks-db-xl", base="builtin:tiny-sdxl", dataset=str(subject), instance_prompt=SUBJECT,
                steps=2, validation_prompts=[])
    folder = Registry(shared_home).checkout(m)
    assert m.base.family == "sdxl" and (folder / "text_encoder_2").is_dir()
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors"):
        base, mine = load_file(str(tiny_sdxl_path / part)), load_file(str(folder / part))
        assert all(torch.equal(base[k], mine[k]) for k in base), part
    base, mine = weights(tiny_sdxl_path, "unet"), weights(folder, "unet")
    assert any(not torch.equal(base[k], mine[k]) for k in base)


def test_a_recipe_trains_on_top_of_its_dreambooth_checkpoint(shared_home, subject, tmp_path):
    """`base: ${db}` names the checkpoint a dreambooth step makes: the recipe validates and the LoRA's base is it."""
    recipe = tmp_path / "db.yaml"
    recipe.write_text(
        "name: dbr\nbase: builtin:tiny-sd\nsteps:\n"
        f"  db: {{train: {{method: dreambooth, dataset: {subject}, instance_prompt: {SUBJECT!r}, steps: 2, "
        f"resolution: {RES}, learning_rate: 1.0e-4, validation_steps: 1}}}}\n"
        f"  style: {{train: {{method: lora, base: '${{db}}', dataset: {subject}, instance_prompt: {SUBJECT!r}, "
        f"steps: 1, resolution: {RES}, validation_steps: 1}}}}\n")
    result = cli_run(shared_home, "recipe", "apply", str(recipe))
    assert result.exit_code == 0, result.output
    registry = Registry(shared_home)
    db, style = registry.resolve("dbr-db"), registry.resolve("dbr-style")
    assert db.kind == "checkpoint" and style.kind == "lora"
    assert style.base.digest == db.digest
