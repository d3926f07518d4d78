"""`loraforge train METHOD` end to end: every trainer runs from the CLI and registers what it says; bad
options are one-line errors that leave the registry unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import run_cli
from loraforge.cli import cli
from loraforge.registry import Registry
from test_train import RES, adapter_state, pattern_images

COMMON = ["--steps", "2", "--resolution", str(RES), "--rank", "4", "--alpha", "8", "--learning-rate", "1e-2",
          "--validation-steps", "2", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def folders(tmp_path: Path) -> dict[str, str]:
    return {
        "stripes": str(pattern_images(tmp_path / "stripes", "stripes", n=2, caption="red stripes")),
        "checks": str(pattern_images(tmp_path / "checks", "checks", n=2, caption="blue checks")),
        "low": str(pattern_images(tmp_path / "low", "dark", n=2)),
        "high": str(pattern_images(tmp_path / "high", "bright", n=2)),
    }


# method -> (extra CLI arguments, names it registers, option values the manifest must record)
CASES = {
    "lora": (["--dataset", "{stripes}", "--crop", "random"], ["out"], {"crop": "random", "dataset": "{stripes}"}),
    "dreambooth_lora": (["--dataset", "{checks}", "--instance-prompt", "a photo of sks dog", "--prior-preservation",
                         "--class-prompt", "a photo of dog", "--num-class-images", "2", "--class-generation-steps", "2"],
                        ["out"], {"instance_prompt": "a photo of sks dog", "prior_preservation": True,
                                  "num_class_images": 2}),
    "joint": (["--adapters", '{{"a": {{"dataset": "{stripes}"}}, "b": {{"dataset": "{checks}", "loss_weight": 0.5}}}}'],
              ["out-a", "out-b"], {"adapters": {"a": {"dataset": "{stripes}", "loss_weight": 1.0},
                                                "b": {"dataset": "{checks}", "loss_weight": 0.5}}}),
    "slider": (["--target", "a person", "--positive", "an old person", "--negative", "a young person",
                "--denoise-steps", "3", "--concept", "age"], ["out"],
               {"positive": "an old person", "negative": "a young person", "concept": "age"}),
    "slider-pairs": (["--low-images", "{low}", "--high-images", "{high}", "--target", "a photo", "--layers", "xattn"],
                     ["out"], {"low_images": "{low}", "layers": "xattn"}),
}


def _fill(value, paths: dict[str, str]):
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, dict):
        return {k: _fill(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value


def adapters_of(home: Path) -> list:
    registry = Registry(home)
    return [registry.resolve(f"{row['name']}:{row['version']}") for row in registry.list()
            if row["kind"] in ("lora", "slider")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_trainer_runs_from_the_cli_and_records_its_options(home, tmp_path, case):
    method = case.split("-")[0]
    args, names, recorded = CASES[case]
    paths = folders(tmp_path)
    result = run_cli(home, "train", method, "--name", "out", *COMMON, *_fill(args, paths), "--json")
    printed = json.loads(result.output)
    registered = adapters_of(home)
    assert sorted(m.ref for m in registered) == sorted(f"{n}:1" for n in names)
    assert sorted(m["name"] for m in printed) == sorted(names)
    for m in registered:
        params = m.provenance.params
        assert m.provenance.method == f"train:{method}"
        assert (params["steps"], params["rank"], params["alpha"], params["seed"], params["resolution"]) == (2, 4, 8.0, 3, RES)
        for key, value in _fill(recorded, paths).items():
            got = params[key]
            if isinstance(value, dict):  # joint adapters: the options given, plus the defaults filled in
                got = {k: {f: v[f] for f in value[k]} for k, v in got.items()}
            assert got == value, key
        assert m.metrics["steps"] == 2 and m.metrics["loss_last"] is not None
        assert adapter_state(home, m).rank == 4


def test_plain_output_names_what_was_registered(home, tmp_path):
    paths = folders(tmp_path)
    result = run_cli(home, "train", "lora", "--name", "plain", *COMMON, "--dataset", paths["stripes"])
    assert "registered plain:1 (lora, rank 4, 2 steps, final loss" in result.output


# ---- train_text_encoder -----------------------------------------------------------------------

def test_joint_trains_a_text_encoder_lora_per_adapter_that_diffusers_loads(home, tmp_path, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    paths = folders(tmp_path)
    adapters = json.dumps({"a": {"dataset": paths["stripes"]}, "b": {"dataset": paths["checks"]}})
    run_cli(home, "train", "joint", "--name", "te", *COMMON, "--adapters", adapters, "--train-text-encoder")
    registry = Registry(home)
    states = {n: adapter_state(home, registry.resolve(f"te-{n}:1")) for n in "ab"}
    for state in states.values():
        assert state.components == ["text_encoder", "unet"]
        assert len(state.component("text_encoder")) == 8  # q, k, v, out projections of both layers
    te = {n: states[n].component("text_encoder") for n in "ab"}
    name = sorted(te["a"])[0]
    assert not torch.equal(te["a"][name].up, te["b"][name].up)  # each adapter trained its own text LoRA

    out = tmp_path / "te-a.safetensors"
    run_cli(home, "registry", "export", "te-a", "--format", "diffusers", "-o", str(out))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ids = pipe.tokenizer(["red stripes"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(out))
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-4


def test_slider_refuses_train_text_encoder(home):
    line = _refused(home, ["train", "slider", "--name", "s", "--target", "a person", "--positive", "old",
                           "--negative", "young", "--train-text-encoder"])
    assert "train_text_encoder is not supported" in line and "drop --train-text-encoder" in line


# ---- refused options ------------------------------------------------------------------------

def _refused(home: Path, args: list[str]) -> str:
    # One small step, so that a check that stopped working fails fast rather than training for minutes.
    result = CliRunner().invoke(cli, ["--home", str(home), *args, "--steps", "1", "--resolution", str(RES)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert Registry(home).list() == []  # not even the dataset snapshot
    return lines[0]


def _method_args(method: str, paths: dict[str, str]) -> list[str]:
    return {
        "lora": ["--dataset", paths["stripes"]],
        "dreambooth_lora": ["--dataset", paths["checks"], "--instance-prompt", "a photo of sks dog"],
        "joint": ["--adapters", json.dumps({"a": {"dataset": paths["stripes"]}})],
        "slider": ["--target", "a person", "--positive", "old", "--negative", "young"],
    }[method]


@pytest.mark.parametrize("method", ["lora", "dreambooth_lora", "joint", "slider"])
def test_rank_above_the_targeted_modules_is_refused_before_the_model_loads(home, tmp_path, monkeypatch, method):
    import loraforge.train.session as session

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the rank was checked")

    monkeypatch.setattr(session, "load_training_model", no_loading)
    line = _refused(home, ["train", method, "--name", "big", "--rank", "100000",
                           *_method_args(method, folders(tmp_path))])
    # tiny-sd's attention projections are 32×32 (and 64×64): 32 is the largest rank all of them allow.
    assert "rank 100000" in line and "use rank 32 or less" in line, line


def test_rank_of_the_text_encoder_lora_is_bounded_too(home, tmp_path):
    paths = folders(tmp_path)
    args = ["train", "lora", "--name", "big", "--rank", "64",
            "--target-modules", "linear_2", "--dataset", paths["stripes"]]  # linear_2 is 128×128
    line = _refused(home, [*args, "--train-text-encoder"])
    assert "rank 64" in line and "text_encoder" in line and "use rank 32 or less" in line, line


def test_targets_that_match_no_module_are_refused(home, tmp_path):
    paths = folders(tmp_path)
    line = _refused(home, ["train", "lora", "--name", "x", "--target-modules", "no_such_layer",
                           "--dataset", paths["stripes"]])
    assert "no_such_layer" in line and "match no Linear or Conv2d module of the unet" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_8bit_adam_without_cuda_is_refused(home, tmp_path):
    line = _refused(home, ["train", "lora", "--name", "x", "--use-8bit-adam",
                           *_method_args("lora", folders(tmp_path))])
    assert "use_8bit_adam needs a CUDA GPU" in line and "drop --use-8bit-adam" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is honoured where CUDA exists")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_without_cuda_is_refused(home, tmp_path, precision):
    line = _refused(home, ["train", "lora", "--name", "x", "--mixed-precision", precision,
                           *_method_args("lora", folders(tmp_path))])
    assert f"mixed_precision {precision} needs a CUDA GPU" in line and "--mixed-precision auto" in line


@pytest.mark.parametrize("shape, targets, limit", [
    ((32, 64), ["to_q"], 32),
    ((128, 16), ["to_q"], 16),
    ((320, 4, 3, 3), ["to_q"], 36),  # a conv factors the 320 × (4·3·3) matrix
    ((8, 64, 1, 1), ["to_q"], 8),
    ((48, 48), r".*attn\d\.to_q", 48),  # regex targets, as the slider presets use
])
def test_check_rank_bounds_by_min_in_out_of_the_targeted_modules(shape, targets, limit):
    from loraforge.errors import ConfigError
    from loraforge.train.peft_lora import check_rank

    shapes = {"blocks.0.attn1.to_q": shape, "blocks.0.attn1.to_k": (2, 2)}  # to_k is not targeted
    check_rank(limit, shapes, targets)
    with pytest.raises(ConfigError, match=f"rank {limit + 1} is larger than {limit}.*use rank {limit} or less"):
        check_rank(limit + 1, shapes, targets)


def test_rank_is_checked_on_the_loaded_model_when_headers_cannot_tell(home, tmp_path, monkeypatch):
    """A single-file base has no per-component headers: its loaded modules are checked, before any LoRA
    exists and before the dataset is snapshotted."""
    import loraforge.registry.resolve as resolve
    import loraforge.train.session as session

    monkeypatch.setattr(resolve, "base_targets", lambda base: None)

    def no_injection(*args, **kwargs):
        raise AssertionError("a LoRA was injected before the rank was checked")

    monkeypatch.setattr(session, "inject_lora", no_injection)  # every trainer injects through Session.add_lora
    line = _refused(home, ["train", "lora", "--name", "big", "--rank", "100000",
                           *_method_args("lora", folders(tmp_path))])
    assert "rank 100000" in line and "use rank 32 or less" in line, line


def test_a_plugin_trainer_that_records_no_metrics_still_reports_its_artifact(home, tmp_path):
    import recipe_fake_trainer  # noqa: F401  (registers the `recipe_fake` trainer, whose manifests have no metrics)

    data = pattern_images(tmp_path / "d", "stripes", n=1, caption="x")
    result = run_cli(home, "train", "recipe_fake", "--name", "fake", "--dataset", str(data), "--rank", "2")
    assert result.output.strip().splitlines()[-1] == "registered fake:1 (lora, rank 2)"


def test_make_optimizer_never_falls_back_from_8bit_adam_silently():
    from loraforge.errors import ConfigError
    from loraforge.train.loop import make_optimizer

    with pytest.raises(ConfigError, match="use_8bit_adam needs"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, use_8bit=True)


def test_reward_rank_above_the_targeted_modules_is_refused_before_the_model_loads(home, monkeypatch):
    import loraforge.train.session as session

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the rank was checked")

    monkeypatch.setattr(session, "load_training_model", no_loading)
    result = CliRunner().invoke(cli, ["--home", str(home), "train", "reward", "-n", "big", "--reward", "brightness",
                                      "--prompts", "a cat", "--iterations", "1", "--rank", "100000"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "rank 100000" in lines[0] and "use rank 32 or less" in lines[0]
    assert Registry(home).list() == []
