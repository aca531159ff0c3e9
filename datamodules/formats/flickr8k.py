"""Flickr8k in its native layout (the official ``Flickr8k_text.zip`` and ``Flickr8k_Dataset.zip``).

Text files sit in the root or in ``root/Flickr8k_text/``:

* ``Flickr8k.token.txt``: ``<file name>#<n><TAB><caption>``, five captions per image;
* ``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt`` (the ``val`` split), ``Flickr_8k.testImages.txt``:
  one file name per line.

Images are in ``Flicker8k_Dataset`` (the official zip's spelling), ``Flickr8k_Dataset`` or ``Images`` under the
root, or wherever ``image_dir`` points. The image id is the file name. The token file also lists a few names that
are in no split list (e.g. ``2258277193_586949ec62.jpg.1``); only images of the split list are loaded. An image
in two split lists is an error (the other lists are read, their images are not opened).
"""

from __future__ import annotations

from pathlib import Path

from datamodules.errors import DataError, MissingSplitError
from datamodules.formats._common import (
    SPLITS,
    Listing,
    SplitMembers,
    check_root,
    check_split,
    clean_caption,
    detect_dir,
    finish,
    read_text,
    require_dir,
)
from datamodules.images import resolve_inside
from datamodules.records import ImageRecord

__all__ = ["IMAGE_DIR_CANDIDATES", "SPLIT_FILES", "TOKEN_FILE", "load_flickr8k"]

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES: dict[str, str] = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TEXT_DIRS: tuple[str, ...] = (".", "Flickr8k_text")
IMAGE_DIR_CANDIDATES: tuple[str, ...] = (
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "Flickr8k_Dataset/Flicker8k_Dataset",
    "Images",
    "images",
)


def load_flickr8k(root: str | Path, split: str, *, image_dir: str | None = None) -> list[ImageRecord]:
    """Load one split of Flickr8k from the official text files.

    Args:
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` (the official dev list) or ``"test"``.
        image_dir: Image folder relative to ``root``; by default detected among :data:`IMAGE_DIR_CANDIDATES`.

    Returns:
        One record per image of the split list with all its captions, sorted by file name.

    Raises:
        MissingSplitError: When the split's list file is absent or lists no image.
        DataError: On a missing or malformed text file, a caption without words, an image of the split without
            captions, an image in two split lists, an image path outside the image folder or a missing image.
    """
    check_split(split, "flickr8k")
    base = check_root(root, "flickr8k")
    text_dir = next((base / d for d in TEXT_DIRS if (base / d / TOKEN_FILE).is_file()), None)
    if text_dir is None:
        raise DataError(
            f"the flickr8k format expects the caption file {TOKEN_FILE} in {base} or {base / 'Flickr8k_text'}, "
            "but there is none"
        )
    token_path = text_dir / TOKEN_FILE
    split_path = text_dir / SPLIT_FILES[split]
    if not split_path.is_file():
        raise MissingSplitError(
            f"the flickr8k format expects the {split} split list {SPLIT_FILES[split]} next to {TOKEN_FILE} "
            f"at {split_path}, but there is no such file"
        )

    names = list(_read_list(split_path))
    captions = _read_tokens(token_path, set(names))
    without = [name for name in names if name not in captions]
    if without:
        raise DataError(
            f"{split_path} lists {len(without)} images with no caption in {token_path}; first: {without[0]}"
        )

    if image_dir is None:
        image_root = detect_dir(base, IMAGE_DIR_CANDIDATES, names[:5], "flickr8k", split_path)
    else:
        image_root = require_dir(base / image_dir, "flickr8k", "the images given as image_dir")
    records = [
        ImageRecord(image_id=name, path=resolve_inside(image_root, name, split_path), captions=tuple(captions[name]))
        for name in names
    ]
    _check_disjoint(text_dir, image_root)
    return finish(records, split_path, split, "flickr8k")


def _read_list(path: Path) -> dict[str, int]:
    """Map each file name of a split list to its first line number, in file order (repeats are dropped)."""
    names: dict[str, int] = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            names.setdefault(line.strip(), number)
    return names


def _check_disjoint(text_dir: Path, image_root: Path) -> None:
    """Reject an image file named by two of the split lists present (read as text; no image is opened)."""
    members = SplitMembers()
    for split in SPLITS:
        path = text_dir / SPLIT_FILES[split]
        if not path.is_file():
            continue
        for name, number in _read_list(path).items():
            members.add(image_root, name, Listing(split, path, name, f"line {number}"))


def _read_tokens(path: Path, wanted: set[str]) -> dict[str, list[str]]:
    """Read the captions of the ``wanted`` images from a ``Flickr8k.token.txt`` file."""
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, position = key.strip().rpartition("#")
        if not tab or not hash_sign or not name:
            raise DataError(f"{path} line {number}: expected '<image file>#<n><TAB><caption>', got {line[:60]!r}")
        if name in wanted:
            captions.setdefault(name, []).append(
                clean_caption(caption, path, name, f"caption #{position} (line {number})")
            )
    return captions
