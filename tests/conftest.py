"""Shared fixtures: the tiny builtin models, built once per session, and a fresh loraforge home per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.models.builtin import BUILTIN_NAMES, ensure_builtin
from tests.cli_helpers import link_builtins

# The test machines are shared 2-core boxes.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory) -> Path:
    """A session-wide home holding the builtin models; test homes link to its folders."""
    return tmp_path_factory.mktemp("builtin-home")


@pytest.fixture(scope="session")
def tiny_sd_path(builtin_home) -> Path:
    return ensure_builtin("tiny-sd", builtin_home)


@pytest.fixture(scope="session")
def tiny_sdxl_path(builtin_home) -> Path:
    return ensure_builtin("tiny-sdxl", builtin_home)


@pytest.fixture(scope="session")
def shapes_path(builtin_home) -> Path:
    """builtin:shapes installed (copied from the committed, trained weights)."""
    return ensure_builtin("shapes", builtin_home)


@pytest.fixture(scope="session")
def tiny_flux_path(builtin_home) -> Path:
    return ensure_builtin("tiny-flux", builtin_home)


@pytest.fixture(scope="session")
def builtin_folders(tiny_sd_path, tiny_sdxl_path, shapes_path, tiny_flux_path) -> dict[str, Path]:
    """Every builtin model's session-wide folder, by name."""
    folders = {"tiny-sd": tiny_sd_path, "tiny-sdxl": tiny_sdxl_path, "shapes": shapes_path, "tiny-flux": tiny_flux_path}
    assert set(folders) == set(BUILTIN_NAMES), "give every builtin a session fixture"
    return folders


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: on a shared 2-core box, two spinning threads per process run
    many times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path, monkeypatch, builtin_folders) -> Path:
    """An empty loraforge home set as `$LORAFORGE_HOME`, with the session's builtin models linked in.

    The links point at shared folders: a test must not write into `home/models/builtin/*`.
    """
    path = link_builtins(tmp_path / "home", builtin_folders)
    monkeypatch.setenv("LORAFORGE_HOME", str(path))
    return path


@pytest.fixture()
def adapter_file(tmp_path, tiny_sd_path) -> Path:
    """A small random kohya LoRA for tiny-sd (rank 2, seed 3) in the test's folder."""
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    path = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=3), path, "kohya")
    return path
