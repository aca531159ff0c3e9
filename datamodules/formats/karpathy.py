"""Karpathy splits (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``).

The file is ``{"dataset": ..., "images": [{"filepath"?, "filename", "split", "sentences": [{"raw", "tokens"}],
"imgid", "cocoid"?}]}`` with ``split`` one of ``train``, ``val``, ``test``, ``restval``. ``restval`` (the COCO
validation images outside Karpathy's 5k val / 5k test) joins ``train`` unless ``restval_to_train=False``, in
which case it belongs to no split. The image id is ``cocoid`` when present, else the file name. Images live
under the image directory, at ``filepath/filename`` when ``filepath`` is given (COCO) and ``filename`` otherwise.
Two entries of different splits naming the same image file are an error (test images would leak into training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.errors import DataError
from datamodules.formats._common import (
    Listing,
    SplitMembers,
    check_root,
    check_split,
    clean_caption,
    detect_dir,
    expect,
    finish,
    get,
    read_json,
    require_dir,
    require_file,
)
from datamodules.images import resolve_inside
from datamodules.records import ImageRecord

__all__ = ["IMAGE_DIR_CANDIDATES", "load_karpathy"]

# Folder names of the official and the common community downloads, tried in this order; the dataset root
# itself comes last (Karpathy's COCO file has ``filepath`` = ``train2014``/``val2014`` folders in the root).
IMAGE_DIR_CANDIDATES: tuple[str, ...] = (
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "flickr30k_images",
    "flickr30k_images/flickr30k_images",
    "Images",
    "images",
)
_SPLITS_IN_FILE = ("train", "val", "test", "restval")


def load_karpathy(
    root: str | Path,
    split: str,
    *,
    file: str | None = None,
    image_dir: str | None = None,
    restval_to_train: bool = True,
) -> list[ImageRecord]:
    """Load one split of a Karpathy-split caption file.

    Args:
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        file: Caption file relative to ``root``; by default the single ``dataset_*.json`` in ``root``.
        image_dir: Image folder relative to ``root``; by default detected among :data:`IMAGE_DIR_CANDIDATES`
            and ``root`` itself, by where the split's first images are.
        restval_to_train: Whether ``restval`` images belong to ``train``.

    Returns:
        One record per image with all its sentences, sorted by image id.

    Raises:
        MissingSplitError: When no entry of the file belongs to the split.
        DataError: On a missing, ambiguous or malformed caption file, a caption without words, an image in two
            splits, an image path outside the image folder or a missing image.
    """
    check_split(split, "karpathy")
    base = check_root(root, "karpathy")
    path = _find_file(base, file)
    data = expect(read_json(path), dict, path, "the top-level JSON value")

    wanted = {split, "restval"} if split == "train" and restval_to_train else {split}
    entries: list[tuple[int | str, str, tuple[str, ...]]] = []
    # Every entry's image file with its effective split, to reject an image that two splits share.
    listings: list[tuple[str, Listing]] = []
    for index, image in enumerate(get(data, "images", list, path, "")):
        where = f"images[{index}]"
        expect(image, dict, path, where)
        image_split = get(image, "split", str, path, where)
        if image_split not in _SPLITS_IN_FILE:
            raise DataError(f"{path}: {where}.split is {image_split!r}; expected one of {', '.join(_SPLITS_IN_FILE)}")
        filename = get(image, "filename", str, path, where)
        filepath = expect(image.get("filepath", ""), str, path, f"{where}.filepath")
        relative = f"{filepath}/{filename}" if filepath else filename
        effective = "train" if image_split == "restval" and restval_to_train else image_split
        if effective != "restval":  # restval kept out of train belongs to no split
            position = where if effective == image_split else f"{where} (split 'restval')"
            listings.append((relative, Listing(effective, path, relative, position)))
        if image_split not in wanted:
            continue
        image_id: int | str = get(image, "cocoid", int, path, where) if "cocoid" in image else filename
        sentences = get(image, "sentences", list, path, where)
        captions = tuple(_sentence(s, path, image_id, f"{where}.sentences[{j}]") for j, s in enumerate(sentences))
        if not captions:
            raise DataError(f"{path}: {where} ({filename}) has no sentences; every image needs at least one caption")
        entries.append((image_id, relative, captions))

    if image_dir is None:
        probes = [relative for _, relative, _ in entries[:5]]
        image_root = detect_dir(base, IMAGE_DIR_CANDIDATES, probes, "karpathy", path)
    else:
        image_root = require_dir(base / image_dir, "karpathy", "the images given as image_dir")
    records = [
        ImageRecord(image_id=image_id, path=resolve_inside(image_root, relative, path), captions=captions)
        for image_id, relative, captions in entries
    ]
    seen: set[int | str] = set()
    for record in records:
        if record.image_id in seen:
            raise DataError(f"{path}: image id {record.image_id!r} appears twice in split {split!r}")
        seen.add(record.image_id)
    members = SplitMembers()
    for relative, listing in listings:
        members.add(image_root, relative, listing)
    return finish(records, path, split, "karpathy")


def _find_file(base: Path, file: str | None) -> Path:
    """Return the caption file: the one given, else the single ``dataset_*.json`` in the root."""
    if file is not None:
        return require_file(base / file, "karpathy", f"the caption file given as file={file!r}")
    found = sorted(p for p in base.glob("dataset_*.json") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"the karpathy format expects a caption file dataset_*.json (dataset_flickr8k.json, "
            f"dataset_flickr30k.json or dataset_coco.json) in {base}, but there is none"
        )
    names = ", ".join(p.name for p in found)
    raise DataError(f"{base} holds several Karpathy caption files ({names}); choose one with file=...")


def _sentence(sentence: Any, path: Path, image_id: int | str, where: str) -> str:
    """Return a sentence's raw text, or its tokens joined when ``raw`` is absent."""
    expect(sentence, dict, path, where)
    raw = sentence.get("raw")
    if raw is None and isinstance(sentence.get("tokens"), list):
        raw = " ".join(str(token) for token in sentence["tokens"])
    return clean_caption(raw, path, image_id, f"caption {where}")
