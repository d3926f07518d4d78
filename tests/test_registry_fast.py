"""The registry's read commands (`ls`, `show`, `lineage`, `tag`): paged and filtered listings, output as
it always was, read-only homes, and a start that imports neither pydantic nor sqlite-utils."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import refused
from cli_helpers import run_cli as run
from loraforge.cli.output import echo_json, echo_json_array, print_table
from loraforge.registry import (
    AdapterInfo, BaseInfo, DatasetInfo, FileEntry, Manifest, Parent, Provenance, RecipeInfo, Registry, SliderInfo,
)

CREATED = "2026-01-02T03:04:05+00:00"


@pytest.fixture()
def filled(tmp_path) -> Path:
    """A home with loras, a checkpoint, a dataset and a slider with every part `show` prints, and aliases."""
    home = tmp_path / "home"
    reg = Registry(home)
    digest, size = reg.blobs.put_bytes(b"x" * 3000)
    files = [FileEntry(path="adapter.safetensors", sha256=digest, size=size)]
    prov = dict(created_at=CREATED, host="me@box", software={"loraforge": "0.1.0"})
    lora = Manifest(name="style", kind="lora", digest="", files=files,
                    base=BaseInfo(ref="builtin:tiny-sd", digest="ab" * 32, family="sd1"),
                    adapter=AdapterInfo(format="kohya", rank=4, alpha=4.0, target_modules=["to_q", "to_k"],
                                        components=["unet", "text_encoder"], num_modules=12),
                    provenance=Provenance(method="import", source="/data/style.safetensors", **prov))
    for _ in range(3):
        reg.register(lora)
    reg.register(lora.model_copy(update={"name": "style-xl", "base": None}))
    reg.register(Manifest(name="ckpt", kind="checkpoint", digest="", files=files, layout="single_file",
                          provenance=Provenance(method="import", source="ckpt.safetensors", **prov)))
    reg.register(Manifest(name="photos", kind="dataset", digest="", files=files,
                          dataset=DatasetInfo(num_images=3, captions={"1.png": "a"}),
                          provenance=Provenance(method="import", **prov)))
    style = reg.resolve("style:2")
    reg.register(Manifest(
        name="age", kind="slider", digest="", files=files, base=style.base, adapter=style.adapter,
        slider=SliderInfo(concept="age", method="text", positive="old person", negative="young person",
                          scale_range=(-2.0, 2.5)),
        metrics={"loss": 0.125, "steps": 40, "curve": [1, 2]},
        provenance=Provenance(method="train:slider", source="recipe.yaml", **{**prov, "parents": [
            Parent(ref="style:2", digest=style.digest, role="input", weight=0.5),
            Parent(ref="photos:1", digest=reg.resolve("photos").digest, role="dataset"),
            Parent(ref="gone:7", digest="c" * 64, role="input"),
        ]}, recipe=RecipeInfo(name="sliders", digest="d" * 64, step="age", input_digest="e" * 64))))
    reg.tag("style:2", "prod")
    reg.tag("style:2", "beta")
    reg.tag("age", "prod")
    return home


ALL = [("age", 1, "slider", ["prod"]), ("ckpt", 1, "checkpoint", []), ("photos", 1, "dataset", []),
       ("style", 1, "lora", []), ("style", 2, "lora", ["beta", "prod"]), ("style", 3, "lora", []),
       ("style-xl", 1, "lora", [])]


def listed(home: Path, *args: str) -> list[tuple]:
    out = run(home, "registry", "ls", "--json", *args).output
    rows = json.loads(out)
    # Written exactly as `echo_json` writes the whole list (what `ls --json` printed before it streamed).
    assert out == json.dumps(rows, indent=2, sort_keys=True) + "\n"
    return [(r["name"], r["version"], r["kind"], r["aliases"]) for r in rows]


def test_ls_json_lists_every_version_with_its_aliases(filled):
    assert listed(filled) == ALL
    row = json.loads(run(filled, "registry", "ls", "--json", "--name", "ckpt").output)[0]
    assert row == {"name": "ckpt", "version": 1, "kind": "checkpoint", "digest": row["digest"], "size": 3000,
                   "created_at": CREATED, "aliases": []} and len(row["digest"]) == 64


@pytest.mark.parametrize("page", [1, 2, 3, 7, 50])
def test_pages_cover_every_version_exactly_once(filled, page):
    pages = [listed(filled, "--limit", str(page), "--offset", str(start)) for start in range(0, 8, page)]
    assert all(len(p) <= page for p in pages)
    assert [row for p in pages for row in p] == ALL
    assert listed(filled, "--offset", "5") == ALL[5:]
    assert listed(filled, "--limit", "0") == []


def test_name_and_kind_filter_in_the_query(filled):
    assert listed(filled, "--name", "style") == ALL[3:6]
    assert listed(filled, "--name", "style*") == ALL[3:]
    assert listed(filled, "--name", "st?le-*") == ALL[6:]
    assert listed(filled, "--kind", "lora") == ALL[3:]
    assert listed(filled, "--kind", "lora", "--name", "style", "--limit", "1", "--offset", "1") == [ALL[4]]
    assert listed(filled, "--kind", "dataset", "--name", "style*") == []
    assert listed(filled, "--name", "nothing") == []


def test_ls_table_is_unchanged(filled):
    assert run(filled, "registry", "ls").output.splitlines() == [
        "name      version  kind        aliases    digest        size    created",
        *[f"{n:<8}  {v}        {k:<10}  {','.join(a):<9}  6f431eb307af  2.9 KB  {CREATED}" for n, v, k, a in ALL],
    ]
    assert run(filled, "registry", "ls", "--limit", "1", "--offset", "6").output.splitlines()[1].startswith(
        "style-xl  1        lora")


@pytest.mark.parametrize("args", [("--limit", "-1"), ("--offset", "-3"), ("--limit", "x"), ("--kind", "bogus")])
def test_bad_paging_options_are_usage_errors(filled, args):
    result = run(filled, "registry", "ls", *args, ok=False)
    assert result.exit_code == 2 and "Error: Invalid value for" in result.output


SHOW_AGE = """\
age:1  (slider)  aliases: prod
digest:   sha256:6f431eb307afea66f9ca64ab4da4e0265c6627237eb6e916a06c87d7e199f4c0
created:  2026-01-02T03:04:05+00:00 on me@box
base:     builtin:tiny-sd (SD1.x, abababababab)
adapter:  rank 4, alpha 4.0, 12 modules on unet, text_encoder; targets to_q, to_k
slider:   concept 'age', scales -2.0 … 2.5, + 'old person' / − 'young person'
made by:  train:slider from recipe.yaml
  input: style:2 weight 0.5
  dataset: photos:1
  input: gone:7
recipe:   sliders step age (input eeeeeeeeeeee)
metrics:  loss=0.125, steps=40
files:
  adapter.safetensors  2.9 KB  e1630f843370
"""

LINEAGE_AGE = """\
age:1 (slider)
├── [input] style:2 (lora) ×0.5
│   └── [base] builtin:tiny-sd (external)
├── [dataset] photos:1 (dataset)
├── [input] gone:7 (external)
└── [base] builtin:tiny-sd (external)
"""


def test_show_text_is_unchanged(filled):
    assert run(filled, "registry", "show", "age").output == SHOW_AGE
    style = run(filled, "registry", "show", "style:prod").output.splitlines()
    assert style[0] == "style:2  (lora)  aliases: beta, prod"
    assert style[5:7] == ["made by:  import from /data/style.safetensors", "files:"]
    assert run(filled, "registry", "show", "photos").output.splitlines()[3:5] == [
        "dataset:  3 images", "made by:  import"]
    assert run(filled, "registry", "show", "style-xl").output.splitlines()[3].startswith("adapter:  rank 4")
    # Every version here has the same files: a digest prefix names the newest.
    assert run(filled, "registry", "show", "sha256:6F431EB3").output == SHOW_AGE


@pytest.mark.parametrize("ref", ["age", "style:prod", "style:1", "style-xl", "ckpt", "photos"])
def test_show_json_is_the_validated_manifest(filled, ref):
    reference = json.dumps(Registry(filled).resolve(ref).model_dump(), indent=2, sort_keys=True, default=str) + "\n"
    assert run(filled, "registry", "show", ref, "--json").output == reference


def test_lineage_is_unchanged(filled):
    assert run(filled, "registry", "lineage", "age:prod").output == LINEAGE_AGE
    tree = json.loads(run(filled, "registry", "lineage", "age", "--json").output)
    assert tree == Registry(filled).lineage("age").to_dict()
    assert [(p["ref"], p["kind"], p["role"], p["weight"]) for p in tree["parents"]] == [
        ("style:2", "lora", "input", 0.5), ("photos:1", "dataset", "dataset", None),
        ("gone:7", "external", "input", None), ("builtin:tiny-sd", "external", "base", None)]


def test_tag_moves_an_alias(filled):
    assert run(filled, "registry", "tag", "style", "prod").output == "style:prod -> style:3\n"
    assert listed(filled, "--name", "style") == [ALL[3], ("style", 2, "lora", ["beta"]), ("style", 3, "lora", ["prod"])]
    assert refused(run(filled, "registry", "tag", "style", "latest", ok=False)).startswith("Error: invalid alias 'latest'")


@pytest.mark.parametrize("args, message", [
    (("show", "nothing"), "no artifact named 'nothing' in the registry (see `loraforge registry ls`)"),
    (("show", "style:9"), "style has no version 9 (latest is 3)"),
    (("lineage", "style:dev"), "style has no alias 'dev'; see `loraforge registry show style`"),
    (("tag", "sha256:0000", "prod"), "no artifact has a digest starting with '0000'"),
    (("show", "a b"), "invalid artifact name 'a b': use letters, digits, '.', '_' and '-' "
                      "(starting with a letter or digit, at most 128 characters)"),
])
def test_unknown_references_are_one_error_line(filled, args, message):
    assert refused(run(filled, "registry", *args, ok=False)) == f"Error: {message}"


def test_read_only_home_lists_pages_shows_and_refuses_tag(filled, monkeypatch):
    real_access = os.access
    home = filled.resolve()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and Path(p) == home)
                        else real_access(p, mode, **kw))
    assert listed(filled, "--limit", "2", "--offset", "3") == ALL[3:5]
    assert run(filled, "registry", "lineage", "age").output == LINEAGE_AGE
    assert run(filled, "registry", "show", "age").output == SHOW_AGE
    assert refused(run(filled, "registry", "tag", "style", "dev", ok=False)) == (
        f"Error: the loraforge home {home} is read-only: cannot move an alias; "
        "set LORAFORGE_HOME (or --home) to a writable folder")


HEAVY = ("pydantic", "sqlite_utils", "torch", "diffusers", "transformers", "numpy", "safetensors")
IMPORTS = """
import sys
from loraforge.cli import cli
try:
    cli(sys.argv[1:], prog_name="loraforge")
except SystemExit as exc:
    assert not exc.code, exc.code
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[0].split(","))), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [("ls",), ("ls", "--json", "--limit", "2"), ("show", "age"), ("show", "age", "--json"),
                                  ("lineage", "age"), ("tag", "style:1", "old")])
def test_read_commands_import_neither_pydantic_nor_sqlite_utils(filled, args):
    done = subprocess.run([sys.executable, "-c", IMPORTS.replace("sys.argv[0]", repr(",".join(HEAVY))),
                           "--home", str(filled), "registry", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


@pytest.mark.parametrize("items", [
    [],
    [{}],
    [{"b": 1, "a": [], "c": None, "d": True, "e": 1.5, "f": float("nan")}],
    [{"name": "x", "aliases": ["p", "q"]}, {"aliases": ["r"], "name": "y"}],
    [{"ünï": "çødé\n\"", "100%": "%s %d"}],
    [{"nested": {"a": [1, {"b": 2}]}, "tuple": (1, 2)}, {"x": ["a", 1, None]}],
    [{1: "non-str key"}, [1, 2], "a string", 3],
])
def test_streamed_json_array_is_echo_json_byte_for_byte(items, capsys):
    echo_json(items)
    whole = capsys.readouterr().out
    echo_json_array(iter(items))
    assert capsys.readouterr().out == whole


def test_a_long_table_streams_in_the_widths_of_its_first_page(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    rows = [("a", 1), ("bb", 22), ("c", 3), ("d", 4)]
    print_table(rows, ["name", "n"])
    whole = capsys.readouterr().out
    print_table(iter(rows), ["name", "n"], page=2)
    assert capsys.readouterr().out == whole
    print_table(iter(rows + [("longer-name", 5)]), ["name", "n"], page=2)
    assert capsys.readouterr().out.splitlines()[-2:] == ["d     4", "longer-name  5"]
