"""One reading of a reference everywhere: Reference.parse decides the kind, and every caller agrees with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import HubError, UnresolvedReference
from loraforge.hub.card import hub_base_id
from loraforge.hub.pull import parse_hub_ref
from loraforge.reference import Reference, check_hub_repo
from tests.cli_helpers import run_cli

# text -> (kind, repo, revision, path relative to the base folder); "exists/…" and "here.safetensors"
# exist in the base folder, nothing else does.
CASES = {
    "builtin:tiny-sd": ("builtin", None, None, None),
    "hf://me/style@v1": ("hub", "me/style", "v1", None),
    "hf://me/style": ("hub", "me/style", None, None),
    "style": ("registry", None, None, None),
    "style:3": ("registry", None, None, None),
    "style:prod": ("registry", None, None, None),
    "sha256:ab12cd": ("registry", None, None, None),
    "x.safetensors": ("registry", None, None, None),  # names may hold dots; no such file here
    "here.safetensors": ("path", None, None, "here.safetensors"),
    "data/x": ("hub_model", "data/x", None, None),  # no such folder: a Hub model id
    "exists/x": ("path", None, None, "exists/x"),
    "org/model@main": ("hub_model", "org/model", "main", None),
    "./missing": ("path", None, None, "missing"),
    "../up": ("path", None, None, "../up"),
}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "exists" / "x").mkdir(parents=True)
    (tmp_path / "here.safetensors").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("text", sorted(CASES))
def test_each_reference_has_one_kind(text, base_dir):
    kind, repo, revision, rel = CASES[text]
    ref = Reference.parse(text, base_dir=base_dir)
    assert (ref.kind, ref.repo, ref.revision) == (kind, repo, revision)
    assert ref.path == (base_dir / rel if rel else None)
    assert str(ref) == text


@pytest.mark.parametrize("text", sorted(CASES))
def test_the_model_card_names_the_base_the_parser_sees(text, base_dir, monkeypatch):
    monkeypatch.chdir(base_dir)  # the card reads the reference as written, relative to where it runs
    kind, repo, _rev, _rel = CASES[text]
    expected = {"builtin": "tiny-sd", "hub": repo, "hub_model": repo}.get(kind)
    assert hub_base_id(text) == expected


def test_paths_are_anchored_where_the_caller_says(base_dir, monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    assert Reference.parse("exists/x").kind == "hub_model"  # not here
    assert Reference.parse("exists/x", base_dir=base_dir).kind == "path"
    assert Reference.parse("~/x").path == Path("~/x").expanduser()


@pytest.mark.parametrize("text, error, message", [
    ("hf://not a repo", HubError, "invalid Hub repo 'not a repo'"),
    ("hf://me/x@", HubError, "empty revision"),
    ("hf://me/--x", HubError, "invalid Hub repo 'me/--x'"),
    ("a/b/c", UnresolvedReference, "'a/b/c' is not an existing file or folder, nor a Hub model id"),
    ("", Exception, "empty reference"),
])
def test_malformed_references_are_one_line_errors(text, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")) as err:
        Reference.parse(text)
    assert "\n" not in str(err.value)


REPO_IDS = ["me/style", "me/asuka-style.v2", "not-a-repo", "me/--x", "me/x..y", "-me/x", "me/-x", "me/x/y", "a b/c"]


@pytest.mark.parametrize("repo", REPO_IDS)
def test_validate_pull_and_push_agree_on_a_hub_repo(repo, home, tmp_path):
    try:
        check_hub_repo(repo)
        accepted = True
    except HubError:
        accepted = False
    try:
        parse_hub_ref(f"hf://{repo}")
        assert accepted
    except HubError:
        assert not accepted
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  a:\n    synthetic: {kind: lora, seed: 1, rank: 2}\n"
                      f"publish:\n  - {{artifact: '${{a}}', repo: '{repo}'}}\n")
    validated = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    pushed = run_cli(home, "hub", "push", "nothing-here", "--repo", repo, ok=False)
    assert ("invalid Hub repo" in validated.output) is (not accepted), validated.output
    assert ("invalid Hub repo" in pushed.output) is (not accepted), pushed.output
    assert pushed.exit_code == 1  # refused repo, or (accepted) no such artifact: nothing reaches the Hub


def test_a_bare_folder_name_is_a_registry_name_and_the_error_says_how_to_mean_the_folder(home, tmp_path,
                                                                                       monkeypatch):
    from loraforge.errors import DatasetError
    from loraforge.registry.registry import Registry
    from loraforge.train.data import prepare_dataset

    (tmp_path / "cats").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="for the folder cats, write ./cats"):
        prepare_dataset(Registry(home), "cats", output="x")
