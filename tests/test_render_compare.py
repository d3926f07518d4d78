"""Comparison renders: one column per artifact at the same seed (the base column is the base's image, a LoRA
column is what `generate` draws with it), sliders composed at fixed scales and named in the labels, a warning
outside a slider's recorded range, illusions denoised with each view's own adapters, and the validation grid
of a trained artifact written out of the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli_helpers import refused, run_cli
from loraforge.cli import cli
from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE, STEPS = 32, 3
PROMPTS = ["a photo of a cat", "a red house"]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def import_lora(home, tmp_path, tiny_sd_path, name, seed, kind="lora", components=("unet",), scale_range=None):
    path = tmp_path / f"{name}.safetensors"
    state = random_lora(module_shapes(tiny_sd_path), rank=4, seed=seed, std=0.5, components=components,
                        targets=("to_q", "to_k", "to_v", "q_proj", "v_proj"))
    write_adapter(state, path, "kohya")
    extra = ["--kind", "slider", "--scale-range", *map(str, scale_range)] if kind == "slider" else []
    run_cli(home, "registry", "import", str(path), "--name", name, *extra)
    return state


@pytest.fixture
def adapters(home, tmp_path, tiny_sd_path):
    import_lora(home, tmp_path, tiny_sd_path, "style", seed=3)
    import_lora(home, tmp_path, tiny_sd_path, "age", seed=4, kind="slider", scale_range=(-2, 2))
    import_lora(home, tmp_path, tiny_sd_path, "smile", seed=5, kind="slider", scale_range=(-1, 1))


def test_compare_columns_are_the_base_a_lora_and_a_checkpoint_at_the_same_seed(home, adapters):
    from loraforge.render.compare import Column, render_comparison
    from loraforge.render.generate import generate_image

    registry = Registry(home)
    warned = []
    result = render_comparison(registry, "builtin:tiny-sd",
                               [Column(), Column((("style:1", 1.0),)), Column((("builtin:shapes", 1.0),))],
                               PROMPTS, seeds=[1], steps=STEPS, size=SIZE, warn=warned.append)
    assert result.column_labels == ["base", "style:1", "builtin:shapes"]
    assert result.row_labels == [f"{p} | seed 1" for p in PROMPTS]
    assert [len(row) for row in result.cells] == [3] * len(PROMPTS)
    assert warned == []
    for row, prompt in zip(result.cells, PROMPTS):
        base = generate_image(registry, "builtin:tiny-sd", [], prompt, seed=1, steps=STEPS, size=SIZE)
        lora = generate_image(registry, "builtin:tiny-sd", ["style:1"], prompt, seed=1, steps=STEPS, size=SIZE)
        shapes = generate_image(registry, "builtin:shapes", [], prompt, seed=1, steps=STEPS, size=SIZE)
        assert np.array_equal(pixels(row[0]), pixels(base))
        assert np.array_equal(pixels(row[1]), pixels(lora))
        assert np.array_equal(pixels(row[2]), pixels(shapes))
        assert np.abs(pixels(row[1]) - pixels(row[0])).mean() > 2.0  # the LoRA column is not the base again
        assert np.abs(pixels(row[2]) - pixels(row[0])).mean() > 2.0


def test_render_cli_writes_one_column_per_artifact_and_names_slider_scales(home, adapters, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, [
        "render", "--base", "builtin:tiny-sd", "--prompt", PROMPTS[0], "--seed", "2", "--steps", "2",
        "--size", str(SIZE), "--compare", "base", "--compare", "style:1", "--compare", "age:1=1.5,smile:1=-0.5",
        "-o", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == ""  # both sliders inside their recorded ranges
    grid = Image.open(out)
    assert result.stdout == f"wrote {out} ({grid.width}x{grid.height}; 1 rows x 3 columns)\n"
    from loraforge.render.grid import GRID_GAP, MIN_GRID_CELL

    assert (grid.width - 3 * MIN_GRID_CELL - 2 * GRID_GAP) > 0  # three cells of 128 px and the row labels


def test_composed_sliders_are_labelled_with_their_scales_and_warned_outside_their_range(home, adapters):
    from loraforge.render.compare import parse_column, render_comparison

    warned = []
    result = render_comparison(Registry(home), "builtin:tiny-sd", [parse_column("age:1=+1.5,smile:1=-2.5")],
                               PROMPTS[:1], steps=1, size=16, warn=warned.append)
    assert result.column_labels == ["age:1=+1.5\nsmile:1=-2.5"]
    assert warned == ["slider smile:1 at scale -2.5 is outside its recorded scale range -1 .. 1; "
                      "images may fall apart there"]


def test_a_local_adapter_file_is_a_column_like_its_registry_artifact(home, adapters, tmp_path):
    from loraforge.render.compare import parse_column, render_comparison

    path = str(tmp_path / "style.safetensors")
    result = render_comparison(Registry(home), "builtin:tiny-sd", [parse_column("style:1"), parse_column(path)],
                               PROMPTS[:1], steps=2, size=16)
    assert result.column_labels == ["style:1", path]
    assert np.array_equal(pixels(result.cells[0][0]), pixels(result.cells[0][1]))


def test_an_adapter_added_to_the_weights_gets_a_pipeline_of_its_own(home, adapters, tmp_path, tiny_sd_path):
    """A full-difference adapter cannot be switched off by set_adapters: the base and LoRA columns beside it stay
    exactly what generate draws without it."""
    from loraforge.render.compare import parse_column, render_comparison
    from loraforge.render.generate import generate_image
    from test_render_variants import _full_diff_adapter

    run_cli(home, "registry", "import", str(_full_diff_adapter(tmp_path, tiny_sd_path)), "--name", "full",
            "--base", "builtin:tiny-sd")
    registry = Registry(home)
    result = render_comparison(registry, "builtin:tiny-sd", [parse_column(c) for c in ("full:1", "base", "style:1")],
                               PROMPTS[:1], steps=2, size=16)
    for cell, loras in zip(result.cells[0], (["full:1"], [], ["style:1"])):
        assert np.array_equal(pixels(cell), pixels(generate_image(registry, "builtin:tiny-sd", loras, PROMPTS[0],
                                                                  steps=2, size=16)))
    assert np.abs(pixels(result.cells[0][0]) - pixels(result.cells[0][1])).mean() > 2.0


def test_an_embedding_column_and_an_embedding_composed_with_a_lora(home, adapters, tmp_path):
    """The embedding's token reads as its vectors in its columns only: the base column, same prompt, is the base's."""
    from loraforge.render.compare import parse_column, render_comparison
    from loraforge.render.generate import generate_image

    source = tmp_path / "mychar.pt"
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)) * 3
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "<mychar>"}, source)
    run_cli(home, "registry", "import", str(source), "--name", "mychar", "--base", "builtin:tiny-sd")
    registry = Registry(home)
    prompt = "a photo of <mychar>"
    result = render_comparison(registry, "builtin:tiny-sd",
                               [parse_column(c) for c in ("base", "mychar:1", "style:1,mychar:1")], [prompt],
                               steps=2, size=16)
    assert result.column_labels == ["base", "mychar:1", "style:1\nmychar:1"]
    for cell, loras in zip(result.cells[0], ([], ["mychar:1"], ["style:1", "mychar:1"])):
        assert np.array_equal(pixels(cell), pixels(generate_image(registry, "builtin:tiny-sd", loras, prompt,
                                                                  steps=2, size=16)))
    assert np.abs(pixels(result.cells[0][1]) - pixels(result.cells[0][0])).mean() > 1.0


def test_the_out_of_range_warning_is_one_line_on_stderr(home, adapters, tmp_path):
    result = CliRunner().invoke(cli, [
        "render", "--base", "builtin:tiny-sd", "--prompt", "x", "--steps", "1", "--size", "16",
        "--compare", "age:1=3", "--compare", "base", "-o", str(tmp_path / "g.png"), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == ("Warning: slider age:1 at scale 3 is outside its recorded scale range -2 .. 2; "
                             "images may fall apart there\n")
    printed = json.loads(result.stdout)
    assert (printed["rows"], printed["columns"]) == (["x | seed 0"], ["age:1=+3", "base"])
    assert printed["size"] == list(Image.open(tmp_path / "g.png").size)


def test_generate_warns_too_naming_the_version(home, adapters, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--base", "builtin:tiny-sd", "--prompt", "x", "--steps", "1",
                                      "--size", "16", "--lora", "smile=-1.5", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == ("Warning: slider smile:1 at scale -1.5 is outside its recorded scale range -1 .. 1; "
                             "images may fall apart there\n")


@pytest.mark.parametrize("column, message", [
    ("style:1=abc", "Error: invalid weight in 'style:1=abc': write REF=NUMBER, e.g. asuka:3=0.8"),
    ("builtin:shapes,builtin:tiny-sd", "Error: column 'builtin:shapes=1,builtin:tiny-sd=1' names two models "
                                       "(builtin:shapes and builtin:tiny-sd): a column renders on one checkpoint; "
                                       "give each its own column"),
    ("builtin:shapes=0.5", "Error: checkpoint builtin:shapes in a comparison has weight 0.5: a checkpoint is rendered "
                           "as it is; write builtin:shapes without =W (merge it first to blend it)"),
    ("style:1,style:1=2", "Error: column 'style:1=1,style:1=2' names style:1 twice: give each artifact once, with "
                          "the weight wanted"),
    ("nosuch", "nosuch"),
])
def test_bad_columns_are_one_line_errors(home, adapters, tmp_path, column, message):
    out = tmp_path / "g.png"
    result = CliRunner().invoke(cli, ["render", "--base", "builtin:tiny-sd", "--prompt", "x", "--steps", "1",
                                      "--compare", column, "-o", str(out)])
    line = refused(result)
    assert line.startswith(message) if message.startswith("Error") else message in line
    assert not out.exists()


RECIPE = """\
name: cmp
base: builtin:tiny-sd
steps:
  lora: {synthetic: {kind: lora, seed: 1, std: 0.5}}
  ckpt: {synthetic: {kind: checkpoint, seed: 2, scale: 0.05}}
  age: {synthetic: {kind: slider, seed: 3, std: 0.5}}
  a: {synthetic: {kind: lora, seed: 4, std: 0.5}}
  b: {synthetic: {kind: lora, seed: 5, std: 0.5}}
  grid:
    render:
      compare: [base, ${lora}, ${ckpt}, [${lora}, {ref: ${age}, weight: -4}]]
      prompts: ["a photo of a cat"]
      seed: 1
      steps: 2
      size: 16
  anagram:
    render:
      prompts: ["a cat | a dog"]
      views: [{view: identity, adapters: [${a}]}, {view: vflip, adapters: [${b}]}]
      steps: 2
      size: 16
"""


def test_recipe_compare_and_per_view_illusion_steps(home, tmp_path):
    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(RECIPE)
    result = CliRunner().invoke(cli, ["--home", str(home), "recipe", "apply", str(recipe)])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == ("Warning: slider cmp-age:1 at scale -4 is outside its recorded scale range -3 .. 3; "
                             "images may fall apart there\n")
    registry = Registry(home)
    grid = registry.resolve("cmp-grid")
    assert grid.provenance.method == "render:compare"
    assert (grid.metrics["rows"], grid.metrics["columns"]) == (1, 4)
    assert [(p.role, p.ref, p.weight) for p in grid.provenance.parents] == [
        ("base", "builtin:tiny-sd", None), ("adapter", "cmp-lora:1", 1.0), ("model", "cmp-ckpt:1", None),
        ("adapter", "cmp-lora:1", 1.0), ("adapter", "cmp-age:1", -4.0)]
    anagram = registry.resolve("cmp-anagram")
    assert anagram.provenance.method == "render:illusion" and anagram.metrics["columns"] == 2
    assert {p.ref for p in anagram.provenance.parents if p.role == "adapter"} == {"cmp-a:1", "cmp-b:1"}
    again = CliRunner().invoke(cli, ["--home", str(home), "recipe", "apply", str(recipe)])
    assert again.exit_code == 0 and "0 step(s) run" in again.output, again.output


@pytest.mark.parametrize("body, message", [
    ("compare: [base]\n      sweep: {adapter: x, scales: [1]}", "a comparison (compare) cannot also have sweep"),
    ("compare: [base]\n      adapters: [{ref: x}]", "a comparison (compare) applies no step-wide adapters"),
    ("compare: [base]\n      seed: 1\n      seeds: [2]", "give seed or seeds, not both"),
    ("views: [{view: sideways, adapters: [x]}]", "sideways"),
])
def test_render_spec_conflicts_are_refused_by_validate(home, tmp_path, body, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsteps:\n  g:\n    render:\n      prompts: [a]\n      {body}\n")
    line = refused(CliRunner().invoke(cli, ["recipe", "validate", str(recipe)]))
    assert message in line


# ---- per-view adapters of an illusion -------------------------------------------------------------

@pytest.fixture(scope="module")
def two_loras(tiny_sd_path):
    shapes = module_shapes(tiny_sd_path)
    make = lambda seed: random_lora(shapes, rank=4, seed=seed, std=0.5, components=("unet", "text_encoder"),  # noqa: E731
                                    targets=("to_q", "to_k", "to_v", "q_proj", "v_proj"))
    return make(11), make(12)


def _pipe(tiny_sd_path):
    from loraforge.models.base import base_from_path
    from loraforge.models.pipeline import load_pipeline

    base = base_from_path(tiny_sd_path, "builtin:tiny-sd", tiny_sd_path.parent.parent.parent)
    return load_pipeline(base, "cpu", torch.float32)


def test_each_view_is_denoised_with_its_own_adapters(tiny_sd_path, two_loras):
    """Per-view adapters equal a direct computation with one plain diffusers pipeline per view, and differ
    from applying both adapters to every view."""
    from diffusers import DDIMScheduler

    from loraforge.formats import lora_to_diffusers
    from loraforge.render.adapters import apply_adapters
    from loraforge.render.illusion import get_view, illusion_sample

    a, b = two_loras
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    prompts, guidance, steps = ["a cat", "a dog"], 4.0, 3
    pipe = _pipe(tiny_sd_path)
    name_a, name_b = apply_adapters(pipe, [(a, 1.0), (b, 0.7)])
    per_view = illusion_sample(pipe, prompts, ["identity", "vflip"], steps=steps, guidance=guidance, latents=x_T,
                               output="latent", view_adapters=[[(name_a, 1.0)], [(name_b, 0.7)]])
    both = illusion_sample(pipe, prompts, ["identity", "vflip"], steps=steps, guidance=guidance, latents=x_T,
                           output="latent", view_adapters=[[(name_a, 1.0), (name_b, 0.7)]] * 2)

    # Direct: view i's ε from a pipeline holding only adapter i (loaded by diffusers itself), averaged by hand.
    pipes = []
    for state, weight in ((a, 1.0), (b, 0.7)):
        p = _pipe(tiny_sd_path)
        p.load_lora_weights(dict(lora_to_diffusers(state)[0]), adapter_name="only")
        p.set_adapters(["only"], adapter_weights=[weight])
        pipes.append(p)
    flip = get_view("vflip")

    def text(p, prompt):
        ids = p.tokenizer([prompt], padding="max_length", max_length=p.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
        return p.text_encoder(ids)[0]

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        conds = [(text(p, ""), text(p, prompt)) for p, prompt in zip(pipes, prompts)]
        for t in scheduler.timesteps:
            eps = []
            for p, (uncond, cond), view in zip(pipes, conds, [get_view("identity"), flip]):
                xi = view.apply(x)
                out = p.unet(torch.cat([xi, xi]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps.append(view.inverse(out[:1] + guidance * (out[1:] - out[:1])))
            x = scheduler.step((eps[0] + eps[1]) / 2, t, x).prev_sample
    torch.testing.assert_close(per_view, x, atol=1e-4, rtol=1e-4)
    assert (per_view - both).abs().mean() > 10 * (per_view - x).abs().max() + 1e-3


# ---- the validation grid of a trained artifact --------------------------------------------------

def test_show_writes_the_validation_grid_of_a_trained_artifact(home, tmp_path, adapters):
    from test_train import pattern_images

    data = pattern_images(tmp_path / "stripes", "stripes", n=2, caption="red stripes")
    run_cli(home, "train", "lora", "--name", "trained", "--dataset", str(data), "--steps", "1", "--resolution", "32",
            "--rank", "2", "--validation-steps", "1", "--seed", "0")
    registry = Registry(home)
    manifest = registry.resolve("trained:1")
    entry = next(f for f in manifest.files if f.path == "validation.png")
    out = tmp_path / "out" / "v.png"
    result = run_cli(home, "registry", "show", "trained:1", "--validation-grid", str(out))
    assert f"validation grid: wrote {out}" in result.output
    assert out.read_bytes() == registry.blob_path(entry).read_bytes()
    Image.open(out).verify()

    missing = tmp_path / "none.png"
    line = refused(CliRunner().invoke(cli, ["--home", str(home), "registry", "show", "style:1",
                                            "--validation-grid", str(missing)]))
    assert line == ("Error: style:1 (lora) has no validation.png: only artifacts a training run made carry one "
                    "(`loraforge registry show` lists an artifact's files)")
    assert not missing.exists()
