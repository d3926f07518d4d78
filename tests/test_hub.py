"""Hub push/pull against a local Hub-protocol server, driven through the real huggingface_hub client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from loraforge.errors import HubError
from loraforge.formats import read_adapter, write_adapter
from loraforge.models.builtin import BUILTIN_NAMES
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.registry.importer import import_artifact
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run

from hub_server import HubServer

TOKEN = "hf_testTOKENdoNotLeak1234567890"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub; the real client points at it with a dummy token and no Xet."""
    import huggingface_hub.constants as hf_constants

    import loraforge.hub.client as client

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        # HF_ENDPOINT is read at import, so loraforge passes the endpoint explicitly on every call;
        # constants.ENDPOINT is left alone (hf_hub_url rewrites URLs relative to it).
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(client, "RETRY_BASE_WAIT", 0.01)
        yield server


def second_home(tmp_path: Path, home: Path) -> Path:
    """Another empty loraforge home sharing the builtin models."""
    other = tmp_path / "home2"
    (other / "models").mkdir(parents=True)
    (other / "models" / "builtin").symlink_to(home / "models" / "builtin", target_is_directory=True)
    return other


def make_adapter(tmp_path: Path, tiny_sd_path: Path, seed: int, alpha: float | None = None,
                 fmt: str = "kohya", components: tuple[str, ...] = ("unet", "text_encoder")) -> Path:
    state = random_lora(module_shapes(tiny_sd_path), rank=4, alpha=alpha, components=components,
                        targets=("to_q", "to_k", "to_v", "to_out.0", "q_proj", "v_proj"), seed=seed)
    path = tmp_path / f"adapter-{seed}-{alpha}.safetensors"
    write_adapter(state, path, fmt)
    return path


def files_contain(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, _, _ = read_adapter(a_path)
    b, _, _ = read_adapter(b_path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name
        assert a[name].alpha == b[name].alpha


# diffusers bakes alpha/rank into lora_B (rounding unless alpha = rank); the kohya copy keeps alpha.
# Whatever was published, the pull must rebuild the registry's exact bytes; when no published file
# can, the registry file itself travels under loraforge/.
@pytest.mark.parametrize("alpha,fmt,exact_copy", [(None, "diffusers", False), (2.0, "both", False),
                                                  (2.0, "diffusers", True)])
def test_push_then_pull_into_empty_home_is_identical(home, hub, tmp_path, tiny_sd_path, alpha, fmt, exact_copy):
    reg = Registry(home)
    import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 1, alpha), "style", base="builtin:tiny-sd")
    pushed = run(home, "hub", "push", "style:1", "--repo", "me/style", "--format", fmt, "--license", "mit")
    assert "pushed style:1 to me/style@" in pushed.output and "tag v1" in pushed.output
    assert TOKEN not in pushed.output
    assert f"Bearer {TOKEN}" in hub.state.auth_headers, "the token from HF_TOKEN must be sent"

    other = second_home(tmp_path, home)
    pulled = run(other, "hub", "pull", "me/style@v1")
    assert TOKEN not in pulled.output
    original, copy = reg.resolve("style:1"), Registry(other).resolve("style")
    assert copy.digest == original.digest
    assert copy.kind == "lora" and copy.adapter.rank == 4
    repo_state = hub.state.repos["me/style"]
    tag_sha = repo_state.tags["v1"]
    assert copy.provenance.source == f"hf://me/style@{tag_sha}"
    assert copy.provenance.method == original.provenance.method
    assert_same_tensors(reg.primary_file(original), Registry(other).primary_file(copy))

    files = repo_state.commits[tag_sha].files
    assert {"pytorch_lora_weights.safetensors", "loraforge.json", "README.md"} <= set(files)
    assert ("style_kohya.safetensors" in files) == (fmt == "both")
    assert ("loraforge/adapter.safetensors" in files) == exact_copy

    card = hub.state.blobs[files["README.md"].sha256].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-sd" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert {"lora", "text-to-image", "diffusers", "loraforge", "stable-diffusion"} <= set(meta["tags"])
    assert "## Lineage" in card and "`style:1`" in card
    for root in (home, other):
        assert not files_contain(root, TOKEN.encode()), "the token must never be written under the home"


def test_pushed_diffusers_file_loads_with_load_lora_weights(home, hub, tmp_path, tiny_sd_path):
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import hf_hub_download

    from loraforge.hub.push import push_artifact

    reg = Registry(home)
    # UNet only: the loaded text encoder's module names are the formats module's business.
    adapter = make_adapter(tmp_path, tiny_sd_path, 3, 2.0, components=("unet",))
    manifest = import_artifact(reg, adapter, "style", base="builtin:tiny-sd")
    push_artifact(reg, "style", "me/style")
    weights = hf_hub_download("me/style", "pytorch_lora_weights.safetensors", revision="v1",
                              cache_dir=tmp_path / "dl", endpoint=hub.endpoint)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    before = pipe.unet.get_submodule(module).weight.detach().clone()
    pipe.load_lora_weights(str(Path(weights).parent), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    after = pipe.unet.get_submodule(module).weight.detach()
    state, _, _ = read_adapter(reg.primary_file(manifest))
    expected = state[f"unet.{module}"].delta()
    torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=1e-4)


def test_repush_uploads_nothing_and_new_version_uploads_only_changed_files(home, hub, tmp_path, tiny_sd_path):
    from loraforge.hub.push import push_artifact

    reg = Registry(home)
    adapter = make_adapter(tmp_path, tiny_sd_path, 1)
    import_artifact(reg, adapter, "style")
    first = push_artifact(reg, "style:1", "me/style")
    weights_size = (reg.checkout(reg.resolve("style:1")) / "adapter.safetensors").stat().st_size
    assert hub.state.uploaded_bytes >= weights_size
    commits_before = len(hub.state.repos["me/style"].commits)

    bytes_before = hub.state.uploaded_bytes
    again = push_artifact(reg, "style:1", "me/style")
    assert again.unchanged and again.commit == first.commit
    assert hub.state.uploaded_bytes == bytes_before, "re-pushing an unchanged version must upload 0 bytes"
    assert len(hub.state.repos["me/style"].commits) == commits_before

    import_artifact(reg, adapter, "style")  # v2: the same weights, a new manifest
    second = push_artifact(reg, "style:2", "me/style")
    assert sorted(second.uploaded_files) == ["README.md", "loraforge.json"]
    small = hub.state.uploaded_bytes - bytes_before
    assert 0 < small < weights_size, f"only the manifest and card may be uploaded, got {small} bytes"

    import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 2), "style")  # v3: new weights
    third = push_artifact(reg, "style:3", "me/style")
    assert "pytorch_lora_weights.safetensors" in third.uploaded_files
    assert set(hub.state.repos["me/style"].tags) == {"v1", "v2", "v3"}


def test_pull_at_tag_branch_and_sha_and_twice_downloads_nothing(home, hub, tmp_path, tiny_sd_path):
    from loraforge.hub.pull import pull_repo
    from loraforge.hub.push import push_artifact

    reg = Registry(home)
    v1 = import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 1), "style")
    v2 = import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 2), "style")
    first = push_artifact(reg, "style:1", "me/style")
    push_artifact(reg, "style:2", "me/style", branch="dev")
    other = Registry(second_home(tmp_path, home))

    at_tag = pull_repo(other, "me/style", "v1")
    assert at_tag.digest == v1.digest
    at_branch = pull_repo(other, "me/style", "dev", name="style-dev")
    assert at_branch.digest == v2.digest and at_branch.name == "style-dev"
    downloaded = hub.state.downloaded_bytes
    at_sha = pull_repo(other, "me/style", first.commit)
    assert at_sha.ref == at_tag.ref, "the same commit pulled again is the same artifact"
    assert pull_repo(other, "me/style", "v1").ref == at_tag.ref
    assert hub.state.downloaded_bytes == downloaded, "a commit already pulled must download nothing"
    assert [(r["name"], r["version"]) for r in other.list()] == [("style", 1), ("style-dev", 1)]

    rows = json.loads(run(home, "hub", "ls", "me/style", "--json").output)
    assert [(r["version"], r["hub_tag"], r["local"]) for r in rows] == [(1, "v1", "style:1"), (2, "v2", "style:2")]
    assert rows[0]["hub_commit"] == first.commit


def test_foreign_kohya_repo_imports_and_hf_refs_resolve(home, hub, tmp_path, tiny_sd_path):
    from loraforge.registry.resolve import load_adapter, resolve_artifact

    kohya = make_adapter(tmp_path, tiny_sd_path, 5, alpha=2.0, fmt="kohya")
    readme = b"---\nbase_model: runwayml/stable-diffusion-v1-5\ninstance_prompt: sks style\n---\n# someone's lora\n"
    sha = hub.state.seed("someone/cool-lora", {"cool_lora_v2.safetensors": kohya.read_bytes(), "README.md": readme,
                                               "samples/a.txt": b"not weights"}, tag="v2")
    reg = Registry(home)
    manifest = resolve_artifact(reg, "hf://someone/cool-lora@v2")
    assert manifest.name == "cool-lora" and manifest.kind == "lora"
    assert manifest.adapter.format == "kohya" and manifest.base.ref == "runwayml/stable-diffusion-v1-5"
    assert manifest.provenance.source == f"hf://someone/cool-lora@{sha}"
    state, loaded = load_adapter(reg, f"hf://someone/cool-lora@{sha}")
    assert loaded.ref == manifest.ref
    original, _, _ = read_adapter(kohya)
    assert sorted(state) == sorted(original)
    for name in original:
        torch.testing.assert_close(state[name].delta(), original[name].delta())


def test_path_traversal_name_is_refused_before_download(home, hub, tmp_path, tiny_sd_path):
    kohya = make_adapter(tmp_path, tiny_sd_path, 5)
    hub.state.seed("evil/lora", {"../../escaped.safetensors": kohya.read_bytes()})
    result = run(home, "hub", "pull", "evil/lora", ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "'../../escaped.safetensors'" in lines[0]
    assert Registry(home).list() == []
    assert hub.state.downloaded_bytes == 0
    assert not list(tmp_path.rglob("escaped.safetensors"))


def test_500_on_first_commit_and_dropped_connection_are_retried(home, hub, tmp_path, tiny_sd_path):
    from loraforge.hub.push import push_artifact

    reg = Registry(home)
    import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 1), "style")
    hub.state.fail("POST", r"/commit/", times=1)
    hub.state.fail("GET", r"/tree/", times=1, kind="drop")
    result = push_artifact(reg, "style", "me/style")
    commit_posts = [r for r in hub.state.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commit_posts) == 2, "the failed commit must be retried once"
    repo = hub.state.repos["me/style"]
    assert repo.tags["v1"] == result.commit == repo.branches["main"]
    assert len(repo.commits) == 2, "one initial commit plus exactly one pushed commit"
    assert "pytorch_lora_weights.safetensors" in repo.commits[result.commit].files


def test_server_down_gives_one_line_error_and_rerun_finishes(home, hub, tmp_path, tiny_sd_path):
    reg = Registry(home)
    import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 1), "style")
    other = second_home(tmp_path, home)
    hub.state.fail("*", r".", times=-1)
    for args, where in ((("hub", "push", "style", "--repo", "me/style"), home),
                        (("hub", "pull", "me/style@v1"), other)):
        result = run(where, *args, ok=False)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert "attempts" in lines[0] and TOKEN not in result.output
    assert Registry(other).list() == []

    hub.state.clear_faults()
    run(home, "hub", "push", "style", "--repo", "me/style")
    run(other, "hub", "pull", "me/style@v1")
    assert Registry(other).resolve("style").digest == reg.resolve("style").digest
    for root in (home, other):
        assert not files_contain(root, TOKEN.encode())


def test_bad_input_errors_are_one_line(home, hub):
    result = run(home, "hub", "push", "nope", "--repo", "not-a-repo", ok=False)
    assert result.exit_code == 1 and "invalid Hub repo 'not-a-repo'" in result.output
    result = run(home, "hub", "pull", "me/missing", ok=False)
    assert result.exit_code == 1 and "no Hub repo me/missing" in result.output
    with pytest.raises(HubError):
        from loraforge.hub.pull import parse_hub_ref

        parse_hub_ref("hf://me/x@")


def test_publish_refuses_unknown_options(home):
    from loraforge.errors import ConfigError
    from loraforge.hub import publish

    with pytest.raises(ConfigError, match="unknown publish option"):
        publish(Registry(home), "style", "me/style", privte=True)


def test_builtin_names_in_card_are_builtin_names():
    from loraforge.hub.card import hub_base_id

    assert [hub_base_id(f"builtin:{n}") for n in BUILTIN_NAMES] == list(BUILTIN_NAMES)
    assert hub_base_id("hf://org/base@v2") == "org/base" and hub_base_id("org/base") == "org/base"
    assert hub_base_id("/models/x.safetensors") is None


def test_slider_with_validation_grid_card_and_round_trip(home, hub, tmp_path, tiny_sd_path):
    from PIL import Image

    from loraforge.hub.push import push_artifact
    from loraforge.registry.manifest import SliderInfo

    reg = Registry(home)
    slider = import_artifact(reg, make_adapter(tmp_path, tiny_sd_path, 7), "age", kind="slider",
                             base="builtin:tiny-sd", slider=SliderInfo(concept="age", scale_range=(-2.0, 4.0)))
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    folder = reg.checkout(slider)
    with_grid = reg.register(slider.model_copy(update={"metrics": {"clip_score": 0.25}}),
                             [(folder / "adapter.safetensors", "adapter.safetensors"), (grid, "validation_grid.png")])
    result = push_artifact(reg, with_grid.ref, "me/age")
    files = hub.state.repos["me/age"].commits[result.commit].files
    assert "validation_grid.png" in files
    card = hub.state.blobs[files["README.md"].sha256].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert "slider" in meta["tags"] and meta["base_model_relation"] == "adapter" and "license" not in meta
    assert "![validation_grid.png](validation_grid.png)" in card
    assert "Recommended scale range: -2 to 4." in card and "clip_score" in card

    other = Registry(second_home(tmp_path, home))
    pulled = other.resolve(json.loads(run(other.home, "hub", "pull", "me/age@v2", "--json").output)["name"])
    assert pulled.kind == "slider" and pulled.digest == with_grid.digest
    assert pulled.slider.scale_range == (-2.0, 4.0)
    assert (other.checkout(pulled) / "validation_grid.png").read_bytes() == grid.read_bytes()


def test_checkpoint_push_pull_and_foreign_pipeline_as_base(home, hub, tmp_path, tiny_sd_path):
    from loraforge.hub.push import push_artifact
    from loraforge.registry.resolve import resolve_base

    reg = Registry(home)
    ckpt = import_artifact(reg, tiny_sd_path, "tiny", kind="checkpoint")
    with pytest.raises(Exception, match="only adapters"):
        push_artifact(reg, "tiny", "me/tiny", fmt="kohya")
    push_artifact(reg, "tiny", "me/tiny")
    other = Registry(second_home(tmp_path, home))
    base = resolve_base(other, "hf://me/tiny@v1")
    assert base.layout == "diffusers" and base.family == "sd1"
    assert other.resolve("tiny").digest == ckpt.digest

    files = {p.relative_to(tiny_sd_path).as_posix(): p.read_bytes() for p in tiny_sd_path.rglob("*") if p.is_file()}
    hub.state.seed("someone/tiny-pipe", files)
    foreign = resolve_base(other, "hf://someone/tiny-pipe")
    assert foreign.family == "sd1"
    pulled = other.resolve("tiny-pipe")
    assert pulled.kind == "checkpoint" and pulled.provenance.source.startswith("hf://someone/tiny-pipe@")


def test_a_flux_lora_pushes_with_a_flux_card_and_pulls_into_flux_pipeline(home, hub, tmp_path, tiny_flux_path):
    """A Flux adapter on the Hub: the card says flux and the base, `--format both` also publishes kohya's Flux
    names, the pull rebuilds the registry's bytes with family flux, and FluxPipeline.load_lora_weights reads the
    published diffusers file to the adapter's ΔW."""
    from diffusers import FluxPipeline
    from huggingface_hub import hf_hub_download

    reg = Registry(home)
    state = random_lora(module_shapes(tiny_flux_path), rank=2, alpha=4.0, targets=("to_q", "to_k", "proj_mlp"),
                        seed=5)
    path = tmp_path / "flux.safetensors"
    write_adapter(state, path, "kohya")  # kohya's Flux names: fused qkv and linear1 on the way in
    manifest = import_artifact(reg, path, "fstyle", base="builtin:tiny-flux")
    run(home, "hub", "push", "fstyle:1", "--repo", "me/fstyle", "--format", "both")
    files = hub.state.repos["me/fstyle"].commits[hub.state.repos["me/fstyle"].tags["v1"]].files
    meta = yaml.safe_load(hub.state.blobs[files["README.md"].sha256].decode().split("---")[1])
    assert meta["base_model"] == "tiny-flux" and meta["library_name"] == "diffusers"
    assert "flux" in meta["tags"] and not any(t.startswith("stable-diffusion") for t in meta["tags"])
    kohya_keys = set(read_adapter_keys(hub, files["fstyle_kohya.safetensors"].sha256, tmp_path))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya_keys

    other = second_home(tmp_path, home)
    run(other, "hub", "pull", "me/fstyle@v1")
    copy = Registry(other).resolve("fstyle")
    assert copy.digest == manifest.digest and copy.base.family == "flux"

    weights = hf_hub_download("me/fstyle", "pytorch_lora_weights.safetensors", revision="v1",
                              cache_dir=tmp_path / "dl", endpoint=hub.endpoint)
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    module = "transformer_blocks.1.attn.to_k"
    before = pipe.transformer.get_submodule(module).weight.detach().clone()
    pipe.load_lora_weights(str(Path(weights).parent), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    after = pipe.transformer.get_submodule(module).weight.detach()
    torch.testing.assert_close(after - before, state[f"transformer.{module}"].delta(), atol=1e-5, rtol=1e-4)


def read_adapter_keys(hub, sha256: str, tmp_path: Path) -> list[str]:
    from loraforge.formats.safetensors_io import read_header

    path = tmp_path / f"{sha256[:12]}.safetensors"
    path.write_bytes(hub.state.blobs[sha256])
    return list(read_header(path)[0])
