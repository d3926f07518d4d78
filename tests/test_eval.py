"""`loraforge eval`, the evaluators and the `eval` recipe step: scores equal a direct computation (the pipeline
rendering the same image, the evaluator called by hand), the image cache, stored metrics, table files, errors."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import refused, run_cli
from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = ["--seed", "0", "--seed", "1"]
FAST = ["--steps", "2", "--size", "32"]
BRIGHTNESS = "python:eval_metrics:brightness"

METRICS_MODULE = '''
import numpy as np

def brightness(images, prompts):
    """Mean pixel value in [0, 1]: a metric whose value anyone can check."""
    return [float(np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255) for im in images]

def too_few(images, prompts):
    return [0.5]

def broken(images, prompts):
    return {}["missing"]
'''


@pytest.fixture
def metrics_module(tmp_path, monkeypatch):
    folder = tmp_path / "user-code"
    folder.mkdir()
    (folder / "eval_metrics.py").write_text(METRICS_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("eval_metrics", None)


@pytest.fixture
def loras(home, tmp_path, tiny_sd_path):
    """Two different random LoRAs of tiny-sd in the registry: style:1 and other:1."""
    for name, seed in (("style", 3), ("other", 5)):
        path = tmp_path / f"{name}.safetensors"
        write_adapter(random_lora(module_shapes(tiny_sd_path), rank=4, seed=seed, std=0.5), path, "kohya")
        run_cli(home, "registry", "import", str(path), "--name", name, "--base", "builtin:tiny-sd")
    return home


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_sd_path) -> Path:
    """A random CLIP model (32 px vision tower, tiny-sd's tokenizer) saved with its processor, as a user's
    local CLIP folder would be."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def eval_json(home, *args) -> dict:
    result = run_cli(home, "eval", *args, "--json")
    return json.loads(result.stdout)


def prompt_args(prompts=PROMPTS) -> list[str]:
    return [a for p in prompts for a in ("--prompt", p)]


def direct_images(home, adapters: list[str], prompts=PROMPTS, seeds=(0, 1), steps=2, size=32,
                  base="builtin:tiny-sd", guidance=7.5) -> list[Image.Image]:
    """The images rendered here with the pipeline, prompt-major, as a user would with diffusers."""
    from loraforge.models.pipeline import generate
    from loraforge.render.adapters import load_pipeline_with_adapters

    pipe, _base, _loaded = load_pipeline_with_adapters(Registry(home), base, adapters)
    return [generate(pipe, p, seed=s, steps=steps, guidance=guidance, height=size, width=size)
            for p in prompts for s in seeds]


def test_clip_score_equals_the_pipeline_image_scored_by_clip(loras, tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    out = eval_json(loras, "style", "base", *prompt_args(), *SEEDS, *FAST, "--metric", "clip_score",
                    "--metric-option", f"clip_score.model={tiny_clip}")
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    prompts = [p for p in PROMPTS for _ in (0, 1)]
    for row, adapters in zip(out["results"], (["style:1"], [])):
        images = direct_images(loras, adapters)
        with torch.no_grad():
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding="max_length")
            o = model(**inputs)
        want = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds, dim=-1)
        assert row["scores"]["clip_score"] == pytest.approx(want.tolist(), abs=1e-5)
        assert row["metrics"]["clip_score"] == pytest.approx(want.mean().item(), abs=1e-5)
    assert [r["ref"] for r in out["results"]] == ["style", "base"]
    assert out["evaluators"] == {"clip_score": f"1:{tiny_clip}"}
    assert out["results"][0]["metrics"] != out["results"][1]["metrics"]  # the LoRA changes what is drawn

    # image_similarity with CLIP features: each image's best cosine with the reference images' embeddings.
    folder = loras.parent / "refs"
    folder.mkdir()
    references = [Image.new("RGB", (40, 40), c) for c in ((200, 30, 30), (20, 30, 220), (240, 240, 240))]
    for i, im in enumerate(references):
        im.save(folder / f"{i}.png")
    similar = eval_json(loras, "style", *prompt_args(), *SEEDS, *FAST, "--metric", "image_similarity",
                        "--metric-option", f"image_similarity.model={tiny_clip}",
                        "--metric-option", f"image_similarity.reference={folder}")
    with torch.no_grad():
        def embed(images):
            e = model.get_image_features(**processor(images=images, return_tensors="pt"))
            e = e if isinstance(e, torch.Tensor) else e.pooler_output
            return torch.nn.functional.normalize(e.double(), dim=1)

        want = (embed(direct_images(loras, ["style:1"])) @ embed(references).T).max(dim=1).values
    assert similar["results"][0]["scores"]["image_similarity"] == pytest.approx(want.tolist(), abs=1e-5)
    assert similar["cached"] == 4 and similar["rendered"] == 0


def test_second_run_renders_nothing_and_metrics_are_stored_and_shown(loras, metrics_module, monkeypatch):
    from loraforge.registry.evaluations import metrics_of

    args = ["style", "other", "base", *prompt_args(), *SEEDS, *FAST, "--metric", BRIGHTNESS]
    first = eval_json(loras, *args)
    assert (first["rendered"], first["cached"]) == (12, 0)
    cached = sorted((loras / "cache" / "eval-images").rglob("*.png"))
    assert len(cached) == 12

    def no_pipeline(*a, **k):
        raise AssertionError("a pipeline was loaded although every image is cached")

    monkeypatch.setattr("loraforge.render.adapters.load_pipeline_with_adapters", no_pipeline)
    second = eval_json(loras, *args)
    assert (second["rendered"], second["cached"]) == (0, 12)
    assert sorted((loras / "cache" / "eval-images").rglob("*.png")) == cached
    assert [r["metrics"] for r in second["results"]] == [r["metrics"] for r in first["results"]]
    prompt_file = loras.parent / "prompts.txt"
    prompt_file.write_text("# the same prompts, from a file\n" + "\n".join(PROMPTS) + "\n\n")
    from_file = eval_json(loras, "style", "--prompt-file", str(prompt_file), *SEEDS, *FAST, "--metric", BRIGHTNESS)
    assert from_file["prompts"] == PROMPTS and from_file["rendered"] == 0
    # Another seed is new work for the pipeline only for that seed.
    with pytest.raises(AssertionError, match="a pipeline was loaded"):
        run_cli(loras, "eval", "style", *prompt_args(), "--seed", "7", *FAST, "--metric", BRIGHTNESS, ok=False)

    monkeypatch.undo()
    # The brightness of each image, computed here from the pipeline's own images.
    want = np.mean([np.asarray(im, dtype=np.float64).mean() / 255 for im in direct_images(loras, ["style:1"])])
    stored = metrics_of(Registry(loras), "style:1")
    assert stored[BRIGHTNESS]["value"] == pytest.approx(want, abs=1e-9)
    assert stored[BRIGHTNESS]["prompts"] == PROMPTS and stored[BRIGHTNESS]["seeds"] == [0, 1]
    assert stored[BRIGHTNESS]["settings"] == {"sampler": "DDIMScheduler", "steps": 2, "guidance": 7.5, "size": 32,
                                               "base": "builtin:tiny-sd"}
    assert stored[BRIGHTNESS]["evaluator_version"].startswith("src-")
    assert metrics_of(Registry(loras), "other:1")[BRIGHTNESS]["value"] != stored[BRIGHTNESS]["value"]

    shown = run_cli(loras, "registry", "show", "style").stdout
    assert f"  {BRIGHTNESS} = {want:.4f}  (evaluator src-" in shown
    as_json = json.loads(run_cli(loras, "registry", "show", "style:1", "--json").stdout)
    assert as_json["evaluations"][BRIGHTNESS]["value"] == pytest.approx(want, abs=1e-9)


def test_csv_chart_and_grid_files(loras, metrics_module, tmp_path):
    out_dir = tmp_path / "out"
    csv_path, chart, grid = out_dir / "table.csv", out_dir / "chart.png", out_dir / "grid.png"
    out = eval_json(loras, "style", "other", "base", *prompt_args(), "--seed", "0", *FAST, "--metric", BRIGHTNESS,
                    "--csv", str(csv_path), "--chart", str(chart), "--grid", str(grid))
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["ref", "artifact", "kind", BRIGHTNESS]
    assert [(r["ref"], r["artifact"], r["kind"]) for r in rows] == [("style", "style:1", "lora"),
                                                                     ("other", "other:1", "lora"), ("base", "", "base")]
    means = [r["metrics"][BRIGHTNESS] for r in out["results"]]
    assert [float(r[BRIGHTNESS]) for r in rows] == means

    # The grid: one row per prompt, one column per artifact, 32 px images scaled up to 128 px cells.
    g = Image.open(grid)
    assert g.width > 3 * 128 and 2 * 128 < g.height < 3 * 128
    from loraforge.render.grid import GRID_GAP

    right = g.width - 1
    cells = [np.asarray(g.crop((right - (2 - j) * (128 + GRID_GAP) - 127, g.height - 128, right - (2 - j) *
                                (128 + GRID_GAP) + 1, g.height)), dtype=np.float64) for j in range(3)]
    images = [direct_images(loras, a, prompts=PROMPTS[-1:], seeds=(0,))[0] for a in (["style:1"], ["other:1"], [])]
    for cell, image in zip(cells, images):  # the last row shows each artifact's own image of the last prompt
        assert np.abs(cell - np.asarray(image.resize((128, 128), Image.NEAREST), dtype=np.float64)).max() == 0
    assert np.abs(cells[0] - cells[1]).mean() > 1 and np.abs(cells[0] - cells[2]).mean() > 1

    # The chart: a bar per artifact whose height is in proportion to its value (bars start at zero).
    from loraforge.render.chart import PALETTE

    c = np.asarray(Image.open(chart).convert("RGB"))
    heights = []
    for colour in PALETTE[:3]:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        mask = (c == rgb).all(axis=2)
        legend_x = mask.any(axis=0).nonzero()[0].max()  # the legend swatch sits right of the bars
        bar = mask[:, : legend_x - 20]
        heights.append(bar.any(axis=1).sum())
    assert heights == pytest.approx([m / max(means) * max(heights) for m in means], abs=2)


def test_python_metric_and_unknown_metric_errors(loras, metrics_module):
    from loraforge.registry.evaluations import metrics_of

    before = Registry(loras).list()
    error = refused(run_cli(loras, "eval", "style", "--prompt", "x", "--metric", "sharpness", ok=False))
    assert error == ("Error: unknown metric 'sharpness': installed evaluators are clip_score, image_similarity, "
                     "shapes, or python:module:function")
    assert not (loras / "cache" / "eval-images").exists()  # refused before anything rendered
    error = refused(run_cli(loras, "eval", "style", "--prompt", "x", *SEEDS, *FAST, "--metric",
                            "python:eval_metrics:too_few", ok=False))
    assert error == "Error: metric 'python:eval_metrics:too_few' returned 1 scores for 2 images"
    error = refused(run_cli(loras, "eval", "style", "--prompt", "x", *FAST, "--metric", BRIGHTNESS, "--metric",
                            "python:eval_metrics:broken", ok=False))
    assert error == "Error: metric 'python:eval_metrics:broken' failed: KeyError: 'missing'"
    assert metrics_of(Registry(loras), "style:1") == {}  # the brightness of that run is not recorded either
    error = refused(run_cli(loras, "eval", "style", "--prompt", "x", "--metric", "python:eval_metrics:nothing",
                            ok=False))
    assert error == ("Error: module 'eval_metrics' has no function 'nothing' (python metric "
                     "'eval_metrics:nothing')")
    error = refused(run_cli(loras, "eval", str(loras.parent / "style.safetensors"), "--prompt", "x", "--metric",
                            BRIGHTNESS, ok=False))
    assert error.startswith(f"Error: {loras.parent / 'style.safetensors'} is a local file or folder, not a model: "
                            "import it first")
    assert Registry(loras).list() == before


def test_image_similarity_defaults_to_the_training_dataset(loras, tmp_path):
    """A trained artifact's reference is its training dataset (a parent of its manifest); the score is the mean
    best-match cosine of the images' pixel features, computed here with numpy."""
    from loraforge.registry.importer import import_artifact
    from loraforge.registry.manifest import Parent

    data = tmp_path / "faces"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    reg = Registry(loras)
    dataset = import_artifact(reg, data, "faces", kind="dataset", instance_prompt="a face")
    style = reg.resolve("style:1")
    parents = [*style.provenance.parents, Parent(ref=dataset.ref, digest=dataset.digest, role="dataset")]
    reg.register(style.model_copy(update={"name": "trained", "provenance": style.provenance.model_copy(
        update={"parents": parents})}))
    out = eval_json(loras, "trained", *prompt_args(), "--seed", "0", *FAST, "--metric", "image_similarity",
                    "--metric-option", "image_similarity.features=pixels")

    def features(images):
        rows = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float64).ravel()
                         for im in images])
        rows -= rows.mean(axis=1, keepdims=True)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    refs = features([Image.open(data / f"{i}.png") for i in range(3)])
    want = (features(direct_images(loras, ["trained:1"], seeds=(0,))) @ refs.T).max(axis=1)
    assert out["results"][0]["scores"]["image_similarity"] == pytest.approx(want.tolist(), abs=1e-9)
    assert out["evaluators"] == {"image_similarity": "1:pixels32"}

    # An artifact without a training dataset needs the reference option; given, a folder is read as it is.
    error = refused(run_cli(loras, "eval", "style", "--prompt", "x", "--metric", "image_similarity",
                            "--metric-option", "image_similarity.features=pixels", ok=False))
    assert error == ("Error: image_similarity has no reference images for style: its manifest records no training "
                     "dataset; give the reference option (a dataset artifact or a folder of images)")
    again = eval_json(loras, "style", *prompt_args(), "--seed", "0", *FAST, "--metric", "image_similarity",
                      "--metric-option", "image_similarity.features=pixels",
                      "--metric-option", f"image_similarity.reference={data}")
    want = (features(direct_images(loras, ["style:1"], seeds=(0,))) @ refs.T).max(axis=1)
    assert again["results"][0]["scores"]["image_similarity"] == pytest.approx(want.tolist(), abs=1e-9)


RECIPE = """\
steps:
  style:
    import: {path: ./style.safetensors, base: builtin:tiny-sd}
  score:
    eval:
      refs: [${style}, base]
      metrics: [python:eval_metrics:brightness]
      prompts: [a red cat, a blue dog]
      seeds: [0]
      steps: 2
      size: 32
"""


def test_eval_step_records_metrics_registers_a_report_and_reruns_nothing(home, tmp_path, tiny_sd_path,
                                                                         metrics_module):
    from loraforge.recipes.apply import apply_recipe
    from loraforge.registry.evaluations import metrics_of

    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=4, seed=3, std=0.5), tmp_path / "style.safetensors",
                  "kohya")
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(RECIPE)
    reg = Registry(home)
    result = apply_recipe(recipe, reg)
    result.raise_for_failure()
    report = result.outputs["score"]
    assert (report.ref, report.kind) == ("compare-score:1", "report")
    assert [f.path for f in report.files] == ["chart.png", "grid.png", "table.csv", "table.json"]
    assert [(p.ref, p.role) for p in report.provenance.parents] == [("compare-style:1", "input")]
    table = json.loads((reg.checkout(report) / "table.json").read_text())
    value = metrics_of(reg, "compare-style:1")[BRIGHTNESS]["value"]
    assert table["results"][0]["metrics"][BRIGHTNESS] == value
    want = np.mean([np.asarray(im, dtype=np.float64).mean() / 255
                    for im in direct_images(home, ["compare-style:1"], seeds=(0,))])
    assert value == pytest.approx(want, abs=1e-9)

    again = apply_recipe(recipe, Registry(home))
    assert [r.action for r in again.results] == ["reused", "reused"]
    assert len(Registry(home).list(kind="report")) == 1

    # Forced, it scores again from the cached images and registers the same report bytes.
    forced = apply_recipe(recipe, Registry(home), force=["score"])
    assert forced.outputs["score"].ref == "compare-score:2" and forced.outputs["score"].digest == report.digest

    # A user function's version is part of the step's inputs: a new one re-scores.
    from loraforge.recipes.plan import make_plan
    from loraforge.recipes.schema import load_recipe

    import eval_metrics

    eval_metrics.brightness.version = "2"
    step = make_plan(load_recipe(recipe), Registry(home)).step("score")
    assert step.status == "stale" and "python:eval_metrics:brightness version changed (src-" in step.reason
    assert step.reason.endswith(" -> 2)")
    del eval_metrics.brightness.version

    # Another seed is another input: the step runs again and registers the next report.
    recipe.write_text(RECIPE.replace("seeds: [0]", "seeds: [0, 1]"))
    third = apply_recipe(recipe, Registry(home))
    assert [r.action for r in third.results] == ["reused", "built"]
    assert metrics_of(Registry(home), "compare-style:1")[BRIGHTNESS]["seeds"] == [0, 1]


def test_eval_step_refuses_an_unknown_metric_with_its_position(home, tmp_path):
    from loraforge.errors import RecipeError
    from loraforge.recipes.schema import load_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(textwrap.dedent("""\
        steps:
          score:
            eval: {refs: [base], metrics: [clip_score, sharpness], prompts: [x]}
        """))
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert str(err.value) == (f"{recipe}:3:48: steps.score.eval.metrics.1: unknown metric 'sharpness': installed "
                              "evaluators are clip_score, image_similarity, shapes, or python:module:function")


def test_shapes_judge_scores_what_builtin_shapes_draws(home):
    from loraforge.evaluators.shapes import ShapesEvaluator

    prompts = ["a big yellow ring in the centre of a white background",
               "a small yellow square on the right of a black background"]
    out = eval_json(home, "builtin:shapes", *prompt_args(prompts), "--seed", "0", "--steps", "20",
                    "--guidance", "4", "--size", "64", "--metric", "shapes")
    images = direct_images(home, [], prompts=prompts, seeds=(0,), steps=20, size=64, base="builtin:shapes",
                           guidance=4.0)
    want = ShapesEvaluator()(images, prompts)
    assert out["results"][0]["scores"]["shapes"] == pytest.approx(want, abs=1e-6)
    # What the judge reads follows the prompt: each image scores higher on its own prompt than on the other's.
    swapped = ShapesEvaluator()(images, prompts[::-1])
    assert all(own > other for own, other in zip(want, swapped))


def test_an_embedding_is_rendered_with_its_token_like_an_adapter(home, tmp_path, metrics_module):
    from loraforge.formats.embeddings import Embedding, write_embedding

    path = tmp_path / "learned_embeds.safetensors"
    write_embedding(Embedding("<sks>", {"text_encoder": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
                                        * 5}), path)
    run_cli(home, "registry", "import", str(path), "--name", "sks", "--kind", "embedding", "--base", "builtin:tiny-sd")
    prompts = ["a photo of <sks>"]
    out = eval_json(home, "sks", "base", *prompt_args(prompts), "--seed", "0", *FAST, "--metric", BRIGHTNESS)
    assert [(r["ref"], r["kind"], r["artifact"]) for r in out["results"]] == [("sks", "embedding", "sks:1"),
                                                                             ("base", "base", None)]
    for row, adapters in zip(out["results"], (["sks:1"], [])):
        [image] = direct_images(home, adapters, prompts=prompts, seeds=(0,))
        assert row["scores"][BRIGHTNESS] == [np.asarray(image, dtype=np.float64).mean() / 255]
    assert out["results"][0]["scores"] != out["results"][1]["scores"]  # the learned token changes the image


def test_a_prompt_the_judge_cannot_read_is_refused_before_anything_renders(home):
    error = refused(run_cli(home, "eval", "builtin:shapes", "--prompt", "a cat", "--metric", "shapes", ok=False))
    assert error == ("Error: prompt 'a cat' names no shapes-world attribute (a shape, colour, background, size, "
                     "position or style): score it with another evaluator, or give aliases")
    assert not (home / "cache" / "eval-images").exists()


def test_chart_and_grid_labels_drop_the_prefix_the_refs_share():
    """A sweep's refs differ only at their end: the chart and grid say the shared prefix once, in the title."""
    from loraforge.evaluators.base import Subject
    from loraforge.evaluators.evaluate import EvalReport, EvalSettings

    def report(*labels):
        subjects = [Subject(label=label, kind="lora", base="builtin:tiny-sd") for label in labels]
        return EvalReport(subjects=subjects, metrics=["m"], prompts=["p"], seeds=[0], settings=EvalSettings(),
                          evaluator_versions={}, means={}, scores={})

    swept = report("base", "pc-personalise-lora-0.001:1", "pc-personalise-dreambooth-0.0001:1", "style:3")
    assert swept.short_labels() == (["base", "lora-0.001:1", "dreambooth-0.0001:1", "style:3"], "pc-personalise-")
    assert swept._titled("scores", "pc-personalise-") == "scores  (pc-personalise-…)"
    assert report("base", "a-lora:1", "b-lora:1").short_labels() == (["base", "a-lora:1", "b-lora:1"], "")
