"""Dataset snapshots never reach outside their folder through symbolic links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli as run


def image(path: Path, color: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (color, 0, 0)).save(path)
    return path


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    image(folder / "a.png", 10)
    (folder / "a.txt").write_text("a red square")
    return folder


def registry_rows(home: Path) -> list:
    return json.loads(run(home, "registry", "ls", "--json").output)


@pytest.mark.parametrize("link_name, target_name", [
    ("b.png", "outside.png"),         # an image that lives elsewhere
    ("b.txt", "secret.txt"),          # any readable file, as a caption
    ("metadata.jsonl", "secret.txt"),
])
def test_a_link_leaving_the_folder_is_refused(home, photos, tmp_path, link_name, target_name):
    target = tmp_path / target_name
    if target.suffix == ".png":
        image(target, 200)
    else:
        target.write_text('{"file_name": "a.png", "text": "top secret"}')
    (photos / link_name).symlink_to(target)

    result = run(home, "registry", "import", str(photos), "--name", "photos", "--kind", "dataset", ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(photos / link_name) in lines[0] and str(target) in lines[0]
    assert registry_rows(home) == []
    assert not list((home / "blobs").rglob("*")) or all(p.is_dir() for p in (home / "blobs").rglob("*"))


def test_a_linked_folder_leaving_the_dataset_is_refused(home, photos, tmp_path):
    image(tmp_path / "elsewhere" / "c.png", 50)
    (photos / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = run(home, "registry", "import", str(photos), "--name", "photos", "--kind", "dataset", ok=False)
    assert result.exit_code == 1 and str(photos / "more") in result.output
    assert registry_rows(home) == []


def test_links_inside_the_folder_are_fine(home, photos):
    (photos / "copy.png").symlink_to(photos / "a.png")
    (photos / "copy.txt").symlink_to("a.txt")  # relative, resolved inside the folder
    run(home, "registry", "import", str(photos), "--name", "photos", "--kind", "dataset")
    shown = json.loads(run(home, "registry", "show", "photos", "--json").output)
    assert sorted(f["path"] for f in shown["files"]) == ["a.png", "a.txt", "copy.png", "copy.txt"]
    assert shown["dataset"]["captions"]["copy.png"] == "a red square"
