"""Your own images with captions in JSON Lines.

Two layouts are accepted (not both at once):

* ``root/captions.jsonl`` with image paths relative to ``root``;
* ``root/{split}/captions.jsonl`` per split, image paths relative to that split folder.

Each line is one JSON object: ``{"image": "relative/path.jpg", "caption": "..."}`` or
``{"image": ..., "captions": ["...", "..."]}`` (both keys may be combined), with an optional ``"split"``
(``train``, ``val`` or ``test``). Lines naming the same image are merged into one record with all captions.

Split assignment in the single-file layout: when some line has a ``split`` field every line must have one.
When no line has one, every image is assigned by a deterministic hash of its path: the first 8 bytes of
SHA-1 of the path (as written, normalised to ``/`` separators) modulo 10,000 give a bucket, buckets below
9,000 go to ``train``, below 9,500 to ``val`` and the rest to ``test`` (about 90/5/5). The assignment never
depends on the other images, the file order or Python's hash seed, so adding images never moves old ones.
:func:`assign_split` exposes the rule.

The image id is the image path relative to ``root`` (so ``train/cat.jpg`` in the per-split layout). An image
file in two splits (by resolved path, so also through a symlink or a split folder linked to another) is an error.
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path
from typing import Any

from datamodules.errors import DataError, MissingSplitError
from datamodules.formats._common import (
    SPLITS,
    Listing,
    SplitMembers,
    check_root,
    check_split,
    clean_caption,
    finish,
    iter_jsonl,
)
from datamodules.images import resolve_inside
from datamodules.records import ImageRecord

__all__ = ["CAPTIONS_FILE", "assign_split", "load_folder"]

CAPTIONS_FILE = "captions.jsonl"
_BUCKETS = 10_000
_TRAIN_BELOW, _VAL_BELOW = 9_000, 9_500


def assign_split(image: str) -> str:
    """Return the split of an image by the hash rule used when no caption line has a ``split`` field.

    Args:
        image: Image path as written in ``captions.jsonl``.

    Returns:
        ``"train"`` (about 90 %), ``"val"`` (about 5 %) or ``"test"`` (about 5 %).
    """
    digest = hashlib.sha1(_normalise(image).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    return "train" if bucket < _TRAIN_BELOW else "val" if bucket < _VAL_BELOW else "test"


def load_folder(root: str | Path, split: str) -> list[ImageRecord]:
    """Load one split of a folder of images captioned in ``captions.jsonl``.

    Args:
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        One record per image with all its captions, sorted by relative path.

    Raises:
        MissingSplitError: When the split's caption file is absent or lists no image of the split.
        DataError: On a missing or malformed caption file, a bad field, a caption without words, an image in two
            splits, an image path outside its folder or a missing image.
    """
    check_split(split, "folder")
    base = check_root(root, "folder")
    single = base / CAPTIONS_FILE
    per_split = [base / name / CAPTIONS_FILE for name in SPLITS if (base / name / CAPTIONS_FILE).is_file()]
    if single.is_file() and per_split:
        raise DataError(
            f"the folder format found both {single} and per-split {per_split[0]}; keep only one of the two layouts"
        )
    if single.is_file():
        return _load_single(base, single, split)
    if per_split:
        return _load_per_split(base, split)
    raise DataError(
        f"the folder format expects {single} (or {base}/<split>/{CAPTIONS_FILE} for train, val, test), "
        "but there is no such file"
    )


def _load_single(base: Path, path: Path, split: str) -> list[ImageRecord]:
    """Load a split from one ``captions.jsonl`` holding every split."""
    lines = list(iter_jsonl(path))
    with_split = [number for number, obj in lines if "split" in obj]
    if with_split and len(with_split) != len(lines):
        without = next(number for number, obj in lines if "split" not in obj)
        raise DataError(
            f"{path} line {without} has no 'split' field while line {with_split[0]} has one; "
            "give every line a split or none (then images are split by a hash of their path)"
        )
    images: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    members = SplitMembers()
    for number, obj in lines:
        image = _image_field(obj, path, number)
        image_split = _split_field(obj, path, number) if with_split else assign_split(image)
        # Keyed by resolved path: the same image under two spellings or through a symlink is caught too.
        members.add(base, image, Listing(image_split, path, image, f"line {number}"))
        split_of[image] = image_split
        images.setdefault(image, []).extend(_captions(obj, path, number, image))
    chosen = {image: captions for image, captions in images.items() if split_of[image] == split}
    records = [
        ImageRecord(image_id=image, path=resolve_inside(base, image, path), captions=tuple(captions))
        for image, captions in chosen.items()
    ]
    hint = "" if with_split else " (no line has a 'split' field, so images are split 90/5/5 by a hash of their path)"
    return finish(records, path, split, "folder", hint)


def _load_per_split(base: Path, split: str) -> list[ImageRecord]:
    """Load a split from ``root/{split}/captions.jsonl``."""
    folder = base / split
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        raise MissingSplitError(
            f"the folder format expects the {split} caption file at {path}, but there is no such file"
        )
    images: dict[str, list[str]] = {}
    for number, obj in iter_jsonl(path):
        image = _image_field(obj, path, number)
        if "split" in obj and _split_field(obj, path, number) != split:
            raise DataError(f"{path} line {number} has split {obj['split']!r} but lies in the {split!r} folder")
        images.setdefault(image, []).extend(_captions(obj, path, number, image))
    records = [
        ImageRecord(image_id=f"{split}/{image}", path=resolve_inside(folder, image, path), captions=tuple(captions))
        for image, captions in images.items()
    ]
    _check_disjoint(base)
    return finish(records, path, split, "folder")


def _check_disjoint(base: Path) -> None:
    """Reject an image file that two per-split caption files list (possible when a split folder is a link).

    The other caption files are read for their image paths only; their images are not opened.
    """
    members = SplitMembers()
    for split in SPLITS:
        path = base / split / CAPTIONS_FILE
        if not path.is_file():
            continue
        for number, obj in iter_jsonl(path):
            image = _image_field(obj, path, number)
            members.add(base / split, image, Listing(split, path, image, f"line {number}"))


def _normalise(image: str) -> str:
    """Spell one image one way (``./a//b.jpg`` and ``a\\b.jpg`` are ``a/b.jpg``) so its lines merge."""
    return posixpath.normpath(image.replace("\\", "/"))


def _image_field(obj: dict[str, Any], path: Path, number: int) -> str:
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{path} line {number}: 'image' must be a non-empty relative path string, got {image!r}")
    return _normalise(image.strip())


def _split_field(obj: dict[str, Any], path: Path, number: int) -> str:
    value = obj["split"]
    if value not in SPLITS:
        raise DataError(f"{path} line {number}: 'split' is {value!r}; expected one of {', '.join(SPLITS)}")
    return value


def _captions(obj: dict[str, Any], path: Path, number: int, image: str) -> list[str]:
    """Return the stripped captions of one line from ``caption`` and/or ``captions``."""
    raw: list[Any] = []
    if "caption" in obj:
        raw.append(obj["caption"])
    if "captions" in obj:
        if not isinstance(obj["captions"], list):
            raise DataError(f"{path} line {number}: 'captions' must be a list of strings")
        raw.extend(obj["captions"])
    if "caption" not in obj and "captions" not in obj:
        raise DataError(f"{path} line {number}: expected a 'caption' string or a 'captions' list for {image!r}")
    if not raw:
        raise DataError(f"{path} line {number}: 'captions' for {image!r} is empty; give at least one caption")
    return [clean_caption(text, path, image, f"caption {i} on line {number}") for i, text in enumerate(raw)]
