"""LoRA adapter formats: round trips, interop with real diffusers and PEFT, damaged and hostile files."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.errors import FormatError, IncompatibleBaseError, UnsafePickleError
from loraforge.formats import (
    FORMATS,
    AdapterFormat,
    LoraModule,
    LoraState,
    detect_format,
    diffusers_to_lora,
    kohya_to_lora,
    lora_to_diffusers,
    lora_to_kohya,
    read_adapter,
    register_format,
    scan_adapter,
    write_adapter,
)
from loraforge.formats.lora import with_text_model, without_text_model

torch.set_num_threads(1)


# -- tiny real models ----------------------------------------------------------------------

def _text_encoder(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8, projection_dim=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(xl: bool):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  attention_head_dim=2, norm_num_groups=4)
    if not xl:
        return UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=16, **common).eval()
    return UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                transformer_layers_per_block=(1, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=6 * 4 + 16, **common).eval()


@pytest.fixture(scope="session")
def bases():
    torch.manual_seed(0)
    sd1 = {"unet": _unet(False), "text_encoder": _text_encoder()}
    sdxl = {"unet": _unet(True), "text_encoder": _text_encoder(), "text_encoder_2": _text_encoder(True)}
    return {"sd1": sd1, "sdxl": sdxl}


def targets_of(models) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical module paths → weight shapes; text-encoder paths under `text_model.` as files spell
    them, whether or not the installed transformers builds CLIPTextModel with that wrapper."""
    return {
        component: {(name if component == "unet" else with_text_model(name)): tuple(mod.weight.shape)
                    for name, mod in model.named_modules()
                    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
        for component, model in models.items()
    }


def random_state(models, dtype=torch.float32, seed=0, every=1) -> LoraState:
    """A LoRA on every `every`-th linear/conv module, with mixed ranks and alphas."""
    gen = torch.Generator().manual_seed(seed)
    state = LoraState()
    i = 0
    for component, shapes in targets_of(models).items():
        for path, shape in sorted(shapes.items()):
            i += 1
            if i % every:
                continue
            rank = (2, 4, 3)[i % 3]
            alpha = (1.0, 4.0, 0.5, float(rank))[i % 4]
            if len(shape) == 4:
                down = torch.randn(rank, *shape[1:], generator=gen)
                up = torch.randn(shape[0], rank, 1, 1, generator=gen)
            else:
                down = torch.randn(rank, shape[1], generator=gen)
                up = torch.randn(shape[0], rank, generator=gen)
            state[f"{component}.{path}"] = LoraModule((down * 0.1).to(dtype), (up * 0.1).to(dtype), alpha)
    return state


def patched(model, state: LoraState, component: str):
    """A copy of `model` with W + ΔW written into its weights: the reference every loader must match."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, m in state.component(component).items():
            module = modules[path] if path in modules else modules[without_text_model(path)]
            module.weight += m.delta(module.weight.dtype)
    return model


def unet_out(unet, xl: bool):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, 32 if xl else 16, generator=gen)
    extra = {}
    if xl:
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16, generator=gen),
                                      "time_ids": torch.randn(1, 6, generator=gen)}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, **extra).sample


def te_out(te):
    ids = torch.tensor([[1, 5, 9, 3, 2, 7]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def assert_states_equal(a: LoraState, b: LoraState, exact=True):
    assert sorted(a) == sorted(b)
    for name in a:
        if exact:
            assert a[name].alpha == b[name].alpha, name
            for x, y in ((a[name].down, b[name].down), (a[name].up, b[name].up)):
                assert x.dtype == y.dtype and torch.equal(x, y), name
        else:
            torch.testing.assert_close(a[name].delta(), b[name].delta(), rtol=1e-5, atol=1e-7)


FAMILIES = ["sd1", "sdxl"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# -- the in-memory representation ----------------------------------------------------------

def test_summary_properties_and_canonical_round_trip(bases):
    state = random_state(bases["sdxl"], every=5)
    assert state.components == ["text_encoder", "text_encoder_2", "unet"]
    assert state.rank == 4 and set(state.ranks.values()) == {2, 3, 4}
    assert "to_q" in state.target_modules or "q_proj" in state.target_modules
    assert state.dtype == torch.float32
    assert state.num_parameters == sum(m.down.numel() + m.up.numel() for m in state.values())
    sd = state.to_state_dict()
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    assert all(sd[k].dtype == torch.float32 and sd[k].dim() == 0 for k in sd if k.endswith(".alpha"))
    assert_states_equal(LoraState.from_state_dict(sd), state)
    assert state.cast(torch.float16).dtype == torch.float16


def test_conv_delta_equals_the_two_convolutions():
    gen = torch.Generator().manual_seed(0)
    m = LoraModule(down=torch.randn(3, 5, 3, 3, generator=gen), up=torch.randn(7, 3, 1, 1, generator=gen), alpha=1.5)
    x = torch.randn(1, 5, 6, 6, generator=gen)
    two_step = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, m.down, padding=1), m.up) * m.scale
    assert m.delta().shape == (7, 5, 3, 3)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, m.delta(), padding=1), two_step, rtol=1e-4, atol=1e-5)


def test_check_against_names_the_offending_module(bases):
    state = random_state(bases["sd1"], every=7)
    targets = targets_of(bases["sd1"])
    state.check_against(targets)
    name = sorted(n for n in state if n.startswith("unet."))[0]
    path = name.split(".", 1)[1]
    wrong = {c: dict(t) for c, t in targets.items()}
    wrong["unet"][path] = (99, 99)
    with pytest.raises(IncompatibleBaseError, match=re.escape(f"adapter module {name} has shape")):
        state.check_against(wrong)
    del wrong["unet"][path]
    with pytest.raises(IncompatibleBaseError, match=re.escape(name)):
        state.check_against(wrong)
    with pytest.raises(IncompatibleBaseError, match="no text_encoder"):
        state.check_against({"unet": targets["unet"]})


def test_mismatched_ranks_are_refused():
    with pytest.raises(FormatError, match="rank 4 but up has rank 2"):
        LoraState({"unet.conv_in": LoraModule(torch.zeros(4, 8), torch.zeros(8, 2), 1.0)})


# -- kohya ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kohya_round_trip_is_bit_exact(bases, family, dtype):
    sd = lora_to_kohya(random_state(bases[family], dtype=dtype))
    prefixes = {k.split("_", 2)[1] for k in sd}
    assert prefixes == ({"unet", "te"} if family == "sd1" else {"unet", "te1", "te2"})
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd or \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    back = lora_to_kohya(kohya_to_lora(sd))
    assert sorted(back) == sorted(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and torch.equal(back[key], sd[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_names_match_the_real_modules(bases, family):
    state = random_state(bases[family])
    sd = lora_to_kohya(state)
    by_vocabulary = kohya_to_lora(sd)
    exact = kohya_to_lora(sd, {c: list(t) for c, t in targets_of(bases[family]).items()})
    assert sorted(by_vocabulary) == sorted(exact) == sorted(state)
    by_vocabulary.check_against(targets_of(bases[family]))


def test_kohya_spelling_details_survive_a_round_trip():
    down, up = torch.randn(4, 8, dtype=torch.float16), torch.randn(8, 4, dtype=torch.float16)
    # kohya's SDXL text encoder 1 alone keeps `lora_te1_`; an fp32 alpha next to fp16 weights stays fp32
    sd = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(3.0)}
    state = kohya_to_lora(sd)
    assert list(state) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    back = lora_to_kohya(state)
    assert sorted(back) == sorted(sd) and all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    # no alpha at all means alpha = rank, and none is written back
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    state = kohya_to_lora(no_alpha)
    assert state.alphas == {"text_encoder.text_model.encoder.layers.0.mlp.fc1": 4.0}
    assert sorted(lora_to_kohya(state)) == sorted(no_alpha)


@pytest.mark.parametrize("sd, message", [
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, "hada_w1_a: an incomplete loha module"),
    ({"lora_unet_conv_in.lokr_w1": torch.zeros(2, 2)}, "lokr_w1: an incomplete lokr module"),
    ({"lora_unet_frobnicator_9.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_frobnicator_9.lora_up.weight": torch.zeros(4, 2)}, "lora_unet_frobnicator_9.lora_down.weight"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "has no matching"),
    ({"lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}, "has no matching"),
], ids=["loha", "lokr", "unknown-word", "down-without-up", "up-without-down"])
def test_kohya_refuses(sd, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        kohya_to_lora(sd)


def test_kohya_key_missing_from_the_base_is_named(bases):
    sd = {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}
    with pytest.raises(IncompatibleBaseError, match="lora_unet_conv_in.lora_down.weight"):
        kohya_to_lora(sd, {"unet": ["conv_out"]})


# -- diffusers -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_round_trip_keeps_every_delta(bases, family):
    state = random_state(bases[family])
    sd, metadata = lora_to_diffusers(state)
    assert all(re.fullmatch(r"(unet|text_encoder|text_encoder_2)\..+\.lora_[AB]\.weight", k) for k in sd)
    back = diffusers_to_lora(sd, metadata)
    assert all(m.scale == 1.0 for m in back.values())
    assert_states_equal(back, state, exact=False)


def test_diffusers_reader_takes_alpha_from_the_header_and_old_keys(bases):
    down, up = torch.randn(4, 16), torch.randn(16, 4)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                  "unet.alpha_pattern": {"attn2.to_k": 2}})}
    sd = {"unet.mid_block.attn1.to_q.lora_A.weight": down, "unet.mid_block.attn1.to_q.lora_B.weight": up,
          "unet.mid_block.attn2.to_k.lora_A.weight": down, "unet.mid_block.attn2.to_k.lora_B.weight": up}
    assert diffusers_to_lora(sd, meta).alphas == {"unet.mid_block.attn1.to_q": 8.0, "unet.mid_block.attn2.to_k": 2.0}
    assert diffusers_to_lora(sd).alphas == {"unet.mid_block.attn1.to_q": 4.0, "unet.mid_block.attn2.to_k": 4.0}
    old = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight": up,
        "text_encoder.text_model.encoder.layers.1.mlp.fc1.alpha": torch.tensor(2.0),
    }
    state = diffusers_to_lora(old)
    assert state.alphas == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": 4.0,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 4.0,
        "text_encoder.text_model.encoder.layers.1.mlp.fc1": 2.0,
    }
    kohya_sd = lora_to_kohya(state)
    assert sorted(diffusers_to_lora(kohya_sd)) == sorted(state)  # kohya keys are delegated


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_load_lora_weights_applies_exactly_our_delta(bases, family, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    models = bases[family]
    state = random_state(models, every=2)
    path = tmp_path / "adapter.safetensors"
    write_adapter(state, path, "diffusers")
    xl = family == "sdxl"
    parts = {name: copy.deepcopy(model) for name, model in models.items()}
    if xl:
        pipe = StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None,
                                         scheduler=EulerDiscreteScheduler(), **parts)
    else:
        pipe = StableDiffusionPipeline(vae=None, tokenizer=None, scheduler=EulerDiscreteScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    handler = _Messages()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = handler.lines + [str(w.message) for w in caught]
    assert not [m for m in messages if re.search(r"unexpected|missing|no lora keys", m, re.I)], messages

    torch.testing.assert_close(unet_out(pipe.unet, xl), unet_out(patched(models["unet"], state, "unet"), xl),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(unet_out(pipe.unet, xl), unet_out(models["unet"], xl), atol=1e-4)
    for component in [c for c in state.components if c != "unet"]:
        torch.testing.assert_close(te_out(getattr(pipe, component)),
                                   te_out(patched(models[component], state, component)), rtol=0, atol=1e-5)


# -- PEFT ----------------------------------------------------------------------------------

def test_peft_folders_round_trip_bit_exactly(bases, tmp_path):
    state = random_state(bases["sdxl"], dtype=torch.float16)
    written = write_adapter(state, tmp_path / "all", "peft")
    assert {p.parent.name for p in written} == {"unet", "text_encoder", "text_encoder_2"}
    assert detect_format(tmp_path / "all") == "peft"
    back, fmt, _ = read_adapter(tmp_path / "all")
    assert fmt == "peft"
    assert_states_equal(back, state)

    te2 = LoraState({n: m for n, m in state.items() if n.startswith("text_encoder_2.")})
    written = write_adapter(te2, tmp_path / "te2", "peft")
    assert {p.parent for p in written} == {tmp_path / "te2"}
    assert_states_equal(read_adapter(tmp_path / "te2")[0], te2)


def test_reading_a_folder_written_by_peft(bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(bases["sd1"]["unet"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1", "ff.net.2"],
                        rank_pattern={"proj_in": 2}, alpha_pattern={"to_v": 3}, use_rslora=True)
    model = get_peft_model(unet, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    state, fmt, _ = read_adapter(tmp_path / "peft")
    assert fmt == "peft" and state.components == ["unet"]
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(f"unet.{n}" for n in layers) == sorted(state)
    for path, layer in layers.items():
        torch.testing.assert_close(state[f"unet.{path}"].delta(), layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)


def test_peft_loads_our_folder_with_identical_outputs(bases, tmp_path):
    from peft import PeftModel

    state = LoraState({n: m for n, m in random_state(bases["sd1"], every=2).items() if n.startswith("unet.")})
    write_adapter(state, tmp_path / "ours", "peft")
    model = PeftModel.from_pretrained(copy.deepcopy(bases["sd1"]["unet"]), str(tmp_path / "ours"))
    torch.testing.assert_close(unet_out(model.base_model.model, False),
                               unet_out(patched(bases["sd1"]["unet"], state, "unet"), False), rtol=0, atol=1e-5)


# -- files: every format, detection, damage ------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft", "loraforge", "slider_pt"])
def test_every_format_is_detected_and_read_back(bases, tmp_path, family, fmt):
    state = random_state(bases[family], every=3)
    path = tmp_path / ("adapter" if fmt == "peft" else "adapter.pt" if fmt == "slider_pt" else "adapter.safetensors")
    write_adapter(state, path, fmt, metadata={"loraforge.note": "hello"})
    renamed = path.with_name("no_hint_in_this_name" + path.suffix)
    path.rename(renamed)
    assert detect_format(renamed) == fmt
    back, detected, metadata = read_adapter(renamed)
    assert detected == fmt
    if fmt not in ("slider_pt",):
        assert metadata.get("loraforge.note") == "hello"
    assert_states_equal(back, state, exact=fmt != "diffusers")


def test_formats_are_registered_once():
    assert {"kohya", "diffusers", "peft", "loraforge"} <= set(FORMATS)
    with pytest.raises(FormatError, match="already registered"):
        register_format(AdapterFormat("kohya", "again", FORMATS["kohya"].read, FORMATS["kohya"].write))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "slider.pt"
    torch.save({"lora_unet_conv_in.lora_down.weight": _Evil(marker)}, path)
    assert detect_format(path) == "slider_pt"
    with pytest.raises(UnsafePickleError) as info:
        read_adapter(path)
    message = str(info.value)
    assert message.startswith(f"refusing to unpickle {path}: it contains objects other than tensors (")
    assert "\n" not in message
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_formats_package():
    source = Path(__file__).parents[1] / "loraforge" / "formats"
    for file in source.glob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", file.read_text()):
            assert "weights_only=True" in call, f"{file.name}: {call}"


def _tiny_kohya_file(path: Path, up_value=1.0) -> Path:
    sd = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.full((8, 2, 1, 1), up_value),
          "lora_unet_conv_in.alpha": torch.tensor(1.0)}
    save_file(sd, str(path))
    return path


def _with_header(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated"),
    ("header-too-long", "header claims"),
    ("lying-offsets", "header lies"),
    ("lying-shape", "but gives it"),
    ("overlap", "overlapping"),
    ("empty", "empty"),
    ("nan", "NaN"),
    ("rank-mismatch", "rank"),
    ("no-partner", "has no matching"),
])
def test_damaged_files_fail_with_one_line_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.safetensors"
    f32 = lambda n: b"\0" * (4 * n)  # noqa: E731
    down = "lora_unet_conv_in.lora_down.weight"
    up = "lora_unet_conv_in.lora_up.weight"
    if damage == "truncated":
        full = _tiny_kohya_file(path).read_bytes()
        path.write_bytes(full[: len(full) - 40])
    elif damage == "header-too-long":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif damage == "lying-offsets":
        _with_header(path, {down: {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, f32(8))
    elif damage == "lying-shape":
        _with_header(path, {down: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]}}, f32(8))
    elif damage == "overlap":
        _with_header(path, {down: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                            up: {"dtype": "F32", "shape": [8, 2], "data_offsets": [16, 80]}}, f32(20))
    elif damage == "empty":
        save_file({}, str(path))
    elif damage == "nan":
        _tiny_kohya_file(path, up_value=float("nan"))
    elif damage == "rank-mismatch":
        save_file({down: torch.ones(2, 4, 3, 3), up: torch.ones(8, 3, 1, 1)}, str(path))
    elif damage == "no-partner":
        save_file({down: torch.ones(2, 4, 3, 3)}, str(path))
    with pytest.raises(FormatError) as info:
        read_adapter(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text, text
    if damage == "nan":
        assert up in text
    with pytest.raises(FormatError) as scanned:  # reading the file's bytes without torch refuses it the same way
        scan_adapter(path)
    assert str(scanned.value) == text


def test_written_files_carry_metadata_and_canonical_files_are_exact(bases, tmp_path):
    state = random_state(bases["sd1"], dtype=torch.bfloat16, every=4)
    [path] = write_adapter(state, tmp_path / "a.safetensors", "loraforge", metadata={"loraforge.name": "x"})
    raw = load_file(str(path))
    assert raw.keys() == state.to_state_dict().keys()
    back, fmt, metadata = read_adapter(path)
    assert fmt == "loraforge" and metadata["loraforge.name"] == "x"
    assert_states_equal(back, state)


# -- detection by the parsed header: every header length -----------------------------------

def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _files_for_every_residue(tmp_path: Path, write, step: int) -> dict[int, Path]:
    """residue of the header length mod 256 → a file written by `write(path, padding)` with it."""
    files: dict[int, Path] = {}
    for pad in range(0, 256 * 3):
        path = tmp_path / f"pad{pad}.safetensors"
        write(path, "x" * pad)
        residue = _header_length(path) % 256
        if residue in files:
            path.unlink()
        else:
            files[residue] = path
        if len(files) == 256 // step:
            return files
    raise AssertionError(f"padding reached only residues {sorted(files)}")


def test_safetensors_files_of_every_header_length_are_detected_as_safetensors(tmp_path):
    """A first byte of 0x80 is the low byte of the header length, not a pickle marker."""
    sd = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.full((8, 2, 1, 1), 0.5)}
    state = kohya_to_lora(sd)
    (tmp_path / "lib").mkdir(), (tmp_path / "ours").mkdir(), (tmp_path / "hand").mkdir()

    def by_safetensors(path, pad):  # header lengths are multiples of 8: 32 residues
        save_file(sd, str(path), metadata={"pad": pad})

    def by_loraforge(path, pad):
        write_adapter(state, path, "loraforge", metadata={"pad": pad})

    def by_hand(path, pad):  # other tools pad with any number of spaces: all 256 residues
        header = {"lora_unet_conv_in.lora_down.weight": {"dtype": "F32", "shape": [2, 4, 3, 3],
                                                        "data_offsets": [0, 288]},
                  "lora_unet_conv_in.lora_up.weight": {"dtype": "F32", "shape": [8, 2, 1, 1],
                                                      "data_offsets": [288, 352]}}
        raw = json.dumps(header).encode() + b" " * len(pad)
        data = torch.ones(72).numpy().tobytes() + torch.full((16,), 0.5).numpy().tobytes()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    for folder, write, fmt, step in [("lib", by_safetensors, "kohya", 8), ("ours", by_loraforge, "loraforge", 8),
                                     ("hand", by_hand, "kohya", 1)]:
        files = _files_for_every_residue(tmp_path / folder, write, step)
        assert 0x80 in files
        for residue, path in sorted(files.items()):
            assert detect_format(path) == fmt, (folder, residue)
            back, detected, _ = read_adapter(path)
            assert detected == fmt
            assert_states_equal(back, state)
        load_file(str(files[0x80]))  # the owner's reader agrees these are valid files


# -- PEFT folders of text encoders ---------------------------------------------------------

@pytest.mark.parametrize("component, projection", [("text_encoder", False), ("text_encoder_2", True)])
def test_peft_loads_our_text_encoder_folder_with_identical_outputs(bases, tmp_path, component, projection):
    from peft import PeftModel

    family = "sdxl" if projection else "sd1"
    te = bases[family][component]
    state = LoraState({n: m for n, m in random_state(bases[family]).items() if n.startswith(f"{component}.")})
    unet = LoraState({n: m for n, m in random_state(bases[family], every=5).items() if n.startswith("unet.")})
    both = LoraState({**state, **unet})
    write_adapter(both, tmp_path / "both", "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(te), str(tmp_path / "both" / component))
    assert not [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    torch.testing.assert_close(te_out(model), te_out(patched(te, state, component)),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(te_out(model), te_out(te), atol=1e-4)
    unet_model = PeftModel.from_pretrained(copy.deepcopy(bases[family]["unet"]), str(tmp_path / "both" / "unet"))
    torch.testing.assert_close(unet_out(unet_model.base_model.model, projection),
                               unet_out(patched(bases[family]["unet"], unet, "unet"), projection), rtol=0, atol=1e-5)
    assert_states_equal(read_adapter(tmp_path / "both")[0], both)


def test_reading_a_text_encoder_folder_written_by_peft(bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    te = copy.deepcopy(bases["sd1"]["text_encoder"])
    model = get_peft_model(te, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    state, fmt, _ = read_adapter(tmp_path / "peft")
    assert fmt == "peft" and state.components == ["text_encoder"]
    assert all(n.startswith("text_encoder.text_model.encoder.layers.") for n in state), sorted(state)
    torch.testing.assert_close(te_out(patched(bases["sd1"]["text_encoder"], state, "text_encoder")),
                               te_out(model), rtol=0, atol=1e-5)
