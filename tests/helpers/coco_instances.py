"""Write tiny COCO instances datasets (images + ``annotations/instances_{split}.json``) for the dense-victim tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Sparse category ids on purpose (as in real COCO): labels must come out as 1..K in id order.
CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "ring"}]


def write_instances(
    root: Path,
    split: str,
    images: list[tuple[int, int, int]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``images/{split}/<id>.png`` (grey, ``width`` × ``height``) and the split's instances file.

    Args:
        root: Dataset root (created).
        split: Split name.
        images: ``(image_id, width, height)`` per image.
        annotations: COCO annotations (ids are added).
        categories: The file's categories (default :data:`CATEGORIES`).

    Returns:
        The instances file.
    """
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, width, height in images:
        pixels = np.full((height, width, 3), 200, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    data = {
        "images": entries,
        "annotations": [{"id": k + 1, **a} for k, a in enumerate(annotations)],
        "categories": categories if categories is not None else CATEGORIES,
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def rectangle(category_id: int, x: float, y: float, w: float, h: float, crowd: int = 0) -> dict[str, Any]:
    """An annotation whose polygon is its box."""
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {
        "image_id": 0,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "segmentation": [polygon],
        "iscrowd": crowd,
    }


def write_split(root: Path, split: str, n: int = 6, size: int = 32, polygons: bool = True) -> Path:
    """A split of ``n`` square images, each with one rectangle of category 3 and one of 7 (the last image empty)."""
    images = [(i + 1, size, size) for i in range(n)]
    annotations = []
    for image_id, _, _ in images[:-1]:
        for category, x in ((3, 2 + image_id), (7, 16)):
            annotation = {**rectangle(category, x, 4, 10, 12), "image_id": image_id}
            if not polygons:
                annotation.pop("segmentation")
            annotations.append(annotation)
    return write_instances(root, split, images, annotations)
