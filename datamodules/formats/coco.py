"""Native COCO captions (``captions_*.json``), optionally with ``instances_*.json`` object boxes.

Default layout (also the layout of the generated shapes data)::

    root/annotations/captions_{split}.json     {"images": [{"id", "file_name", "width", "height"}],
                                                "annotations": [{"id", "image_id", "caption"}]}
    root/annotations/instances_{split}.json    optional: {"annotations": [{"image_id", "bbox": [x, y, w, h],
                                                "category_id"}], "categories": [{"id", "name"}]}
    root/images/{split}/<file_name>

For a real COCO download map the split names and point at the image folders, e.g.
``split_names={"train": "train2017", "val": "val2017", "test": "val2017"}, image_dir="{split}"``.
Images listed without any caption are skipped.

Splits must not share images: loading one split also reads the other splits' caption files (not their images)
and rejects a captioned image file, by resolved path, that two of them list. Val and test may read the same
caption file (real COCO has no public test captions); train may not share its file with either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datamodules.errors import DataError
from datamodules.formats._common import (
    SPLITS,
    Listing,
    SplitMembers,
    check_root,
    check_split,
    clean_caption,
    expect,
    fill,
    finish,
    get,
    read_json,
    require_dir,
    require_file,
    require_split_file,
)
from datamodules.images import resolve_inside
from datamodules.records import Box, ImageRecord

__all__ = ["load_coco"]

DEFAULT_CAPTIONS_FILE = "annotations/captions_{split}.json"
DEFAULT_IMAGE_DIR = "images/{split}"
DEFAULT_INSTANCES_FILE = "annotations/instances_{split}.json"


def load_coco(
    root: str | Path,
    split: str,
    *,
    captions_file: str = DEFAULT_CAPTIONS_FILE,
    image_dir: str = DEFAULT_IMAGE_DIR,
    instances_file: str | None = None,
    split_names: Mapping[str, str] | None = None,
) -> list[ImageRecord]:
    """Load one split of a dataset in native COCO captions format.

    Args:
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        captions_file: Captions JSON path relative to ``root``; ``{split}`` is replaced by the split's file name.
        image_dir: Image folder relative to ``root``, same ``{split}`` substitution.
        instances_file: Instances JSON with boxes. ``None`` reads ``annotations/instances_{split}.json`` when it
            exists; an explicit path must exist.
        split_names: Maps ``train``/``val``/``test`` to the names used in file paths (e.g. ``val2017``);
            splits not in the mapping keep their own name.

    Returns:
        One record per captioned image with all its captions, boxes and source size, sorted by image id.

    Raises:
        MissingSplitError: When the split's captions file is absent or captions no image.
        DataError: On a missing or malformed file, a caption without words, an image path outside ``image_dir``,
            an image in two splits or a missing image.
    """
    check_split(split, "coco")
    base = check_root(root, "coco")
    name = (split_names or {}).get(split, split)
    captions_path = require_split_file(base / fill(captions_file, name), "coco", f"the {split} captions file")
    image_root = require_dir(base / fill(image_dir, name), "coco", f"the {split} images")

    data = expect(read_json(captions_path), dict, captions_path, "the top-level JSON value")
    images = _read_images(data, captions_path)
    captions = _read_captions(data, images, captions_path)

    boxes, sizes = _read_instances(base, name, instances_file, captions_path)
    records = []
    for image_id in images:
        if image_id not in captions:
            continue
        file_name, width, height = images[image_id]
        width, height = sizes.get(image_id, (width, height))
        records.append(
            ImageRecord(
                image_id=image_id,
                path=resolve_inside(image_root, file_name, captions_path),
                captions=tuple(captions[image_id]),
                boxes=tuple(boxes.get(image_id, ())),
                width=width,
                height=height,
            )
        )
    _check_disjoint(base, split, captions_file, image_dir, split_names or {}, (images, set(captions)))
    return finish(records, captions_path, split, "coco")


def _read_captions(data: dict[str, Any], images: Mapping[int, object], path: Path) -> dict[int, list[str]]:
    """Map image id to its cleaned captions from a COCO file's ``annotations`` list, in file order."""
    captions: dict[int, list[str]] = {}
    for index, annotation in enumerate(get(data, "annotations", list, path, "")):
        where = f"annotations[{index}]"
        expect(annotation, dict, path, where)
        image_id = get(annotation, "image_id", int, path, where)
        if image_id not in images:
            raise DataError(f"{path}: {where} refers to image_id {image_id}, which is not in 'images'")
        caption = clean_caption(annotation.get("caption"), path, image_id, f"caption {where}")
        captions.setdefault(image_id, []).append(caption)
    return captions


def _check_disjoint(
    base: Path,
    split: str,
    captions_file: str,
    image_dir: str,
    split_names: Mapping[str, str],
    loaded: tuple[dict[int, tuple[str, int, int]], set[int]],
) -> None:
    """Reject a captioned image file that the caption files of two splits list.

    ``loaded`` holds ``split``'s images and captioned ids. Other splits' caption files are parsed but their
    captions are not cleaned nor their images opened; a split whose caption file or image folder is absent is
    skipped (loading that split reports it).

    Raises:
        DataError: On an image in two splits, or train reading the same caption file as another split.
    """
    members = SplitMembers()
    readers: dict[Path, str] = {}
    for other in SPLITS:
        name = split_names.get(other, other)
        path = base / fill(captions_file, name)
        image_root = base / fill(image_dir, name)
        if not path.is_file() or not image_root.is_dir():
            continue
        first = readers.setdefault(path.resolve(), other)
        if first != other:
            if "train" in (first, other):
                raise DataError(
                    f"the coco format reads the {first} and the {other} split from the same file {path}, so "
                    f"training would see the {other if first == 'train' else first} images; give train its own "
                    "captions file (check split_names and captions_file)"
                )
            continue  # val and test deliberately read one file (real COCO has no public test captions)
        if other == split:
            images, captioned = loaded
        else:
            data = expect(read_json(path), dict, path, "the top-level JSON value")
            images, captioned = _read_images(data, path), _captioned_ids(data, path)
        for image_id in captioned:
            if image_id not in images:
                continue  # a dangling annotation: loading that split reports it
            file_name = images[image_id][0]
            members.add(image_root, file_name, Listing(other, path, file_name, f"(image id {image_id})"))


def _captioned_ids(data: dict[str, Any], path: Path) -> set[int]:
    """Ids of the images that some annotation of a COCO file captions (captions themselves not checked)."""
    ids: set[int] = set()
    for index, annotation in enumerate(get(data, "annotations", list, path, "")):
        expect(annotation, dict, path, f"annotations[{index}]")
        ids.add(get(annotation, "image_id", int, path, f"annotations[{index}]"))
    return ids


def _read_images(data: dict[str, Any], path: Path) -> dict[int, tuple[str, int, int]]:
    """Map image id to (file name, width, height) from a COCO file's ``images`` list, keeping file order."""
    images: dict[int, tuple[str, int, int]] = {}
    for index, image in enumerate(get(data, "images", list, path, "")):
        where = f"images[{index}]"
        expect(image, dict, path, where)
        image_id = get(image, "id", int, path, where)
        if image_id in images:
            raise DataError(f"{path}: {where} repeats image id {image_id}; image ids must be unique")
        file_name = get(image, "file_name", str, path, where)
        width = expect(image.get("width", 0), int, path, f"{where}.width")
        height = expect(image.get("height", 0), int, path, f"{where}.height")
        images[image_id] = (file_name, width, height)
    return images


def _read_instances(
    base: Path, name: str, instances_file: str | None, captions_path: Path
) -> tuple[dict[int, list[Box]], dict[int, tuple[int, int]]]:
    """Read boxes and image sizes from the instances file, or nothing when the default one is absent."""
    path = base / fill(instances_file or DEFAULT_INSTANCES_FILE, name)
    if instances_file is None and not path.is_file():
        return {}, {}
    require_file(path, "coco", f"the instances file given as instances_file={instances_file!r}")
    data: dict[str, Any] = expect(read_json(path), dict, path, "the top-level JSON value")
    categories: dict[int, str] = {}
    for index, category in enumerate(data.get("categories", [])):
        expect(category, dict, path, f"categories[{index}]")
        category_id = get(category, "id", int, path, f"categories[{index}]")
        categories[category_id] = get(category, "name", str, path, f"categories[{index}]")
    sizes = {}
    for index, image in enumerate(expect(data.get("images", []), list, path, "images")):
        expect(image, dict, path, f"images[{index}]")
        image_id = get(image, "id", int, path, f"images[{index}]")
        width = expect(image.get("width", 0), int, path, f"images[{index}].width")
        height = expect(image.get("height", 0), int, path, f"images[{index}].height")
        sizes[image_id] = (width, height)
    boxes: dict[int, list[Box]] = {}
    for index, annotation in enumerate(get(data, "annotations", list, path, "")):
        where = f"annotations[{index}]"
        expect(annotation, dict, path, where)
        image_id = get(annotation, "image_id", int, path, where)
        bbox = get(annotation, "bbox", list, path, where)
        if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{path}: {where}.bbox must be four numbers [x, y, width, height], got {bbox}")
        category_id = annotation.get("category_id")
        category = categories.get(category_id, "") if isinstance(category_id, int) else ""
        boxes.setdefault(image_id, []).append(Box(*(float(v) for v in bbox), category=category))
    return boxes, sizes
