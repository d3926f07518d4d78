"""Dataset snapshots: a folder of training images and captions, recorded file by file."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import DatasetError
from loraforge.hashing import iter_folder_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captions(folder: Path, images: list[Path]) -> dict[str, str]:
    """Captions from `metadata.jsonl` ({"file_name", "text"|"caption"}) or `.txt` side files."""
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file_name"]] = str(row.get("text", row.get("caption", ""))).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(
                    f"{meta}:{lineno}: each line needs a JSON object with file_name and text ({exc})"
                ) from None
    for image in images:
        rel = image.relative_to(folder).as_posix()
        side = image.with_suffix(".txt")
        if rel not in captions and side.is_file():
            captions[rel] = side.read_text(encoding="utf-8").strip()
    return captions


def check_links_stay_inside(folder: Path) -> None:
    """Refuse symbolic links that lead out of `folder`: through them any readable file on the machine
    would be stored in the snapshot (and could be published). Links within the folder are fine."""
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        if not path.is_symlink() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        target = path.resolve()
        if not target.is_relative_to(root):
            raise DatasetError(f"{path} links to {target}, outside the dataset folder {folder}: "
                               "copy what it points at into the folder, or remove the link")


def scan_dataset(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Image files (checked to decode) and their captions; corrupt images raise DatasetError."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    check_links_stay_inside(folder)
    images = [p for p in iter_folder_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DatasetError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for image in images:
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as exc:
            raise DatasetError(f"cannot read image {image}: {exc.__class__.__name__}: {exc}") from None
    return images, read_captions(folder, images)


def dataset_files(folder: Path) -> list[tuple[Path, str]]:
    """(source, relative path) of every file that belongs to the snapshot: images and caption files."""
    folder = Path(folder)
    images, _ = scan_dataset(folder)
    files = [(p, p.relative_to(folder).as_posix()) for p in images]
    for p in iter_folder_files(folder):
        if p.suffix == ".txt" or p.name == "metadata.jsonl":
            files.append((p, p.relative_to(folder).as_posix()))
    return sorted(set(files), key=lambda x: x[1])


def load_image(path: Path):
    """An RGB PIL image with EXIF rotation applied; transparency is flattened onto white.

    Grayscale, palette and 16-bit images are converted; a file that does not decode raises
    DatasetError naming it.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                flat = Image.new("RGB", im.size, "white")
                flat.paste(im, mask=im.getchannel("A"))
                return flat
            if im.mode == "I;16" or im.mode == "I":
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def complete_captions(captions: dict[str, str], images: list[str], instance_prompt: str | None,
                      folder: Path | str = "the dataset") -> dict[str, str]:
    """Every image's caption: its own, else `instance_prompt`; DatasetError when neither exists."""
    out: dict[str, str] = {}
    missing: list[str] = []
    for rel in images:
        text = (captions.get(rel) or "").strip() or (instance_prompt or "").strip()
        if not text:
            missing.append(rel)
        out[rel] = text
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetError(
            f"image {missing[0]}{more} in {folder} has no caption: add a .txt side file or metadata.jsonl "
            "line, or give an instance prompt"
        )
    return out
