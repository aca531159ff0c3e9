"""Images to caption with ``robucap predict``: a split's images or any folder of image files.

Prediction needs no captions, so it has its own dataset and batch: ``pixel_values``, ``image_id`` and ``file``
(the path written into ``predictions.jsonl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.errors import DataError
from datamodules.images import load_image_uint8
from datamodules.records import ImageRecord

# Extensions Pillow decodes that cameras, datasets and screenshots use; anything else in the folder is skipped.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class PredictItem:
    """One image to caption.

    Attributes:
        image_id: The split's image id, or the path relative to the folder (``/``-separated).
        path: The image file.
    """

    image_id: int | str
    path: Path


def folder_items(directory: str | Path) -> list[PredictItem]:
    """Every image file under ``directory`` (recursively, hidden files skipped), sorted by relative path.

    Raises:
        DataError: The directory does not exist or holds no image file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"data.predict_images {root} is not a directory; expected a folder of image files")
    items = [
        PredictItem(path.relative_to(root).as_posix(), path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    if not items:
        raise DataError(
            f"data.predict_images {root} holds no image file (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return items


def split_items(records: list[ImageRecord]) -> list[PredictItem]:
    """A split's images as prediction items (captions are not needed)."""
    return [PredictItem(record.image_id, record.path) for record in records]


class PredictImages(Dataset):
    """Images decoded at the captioner's size; items are ``{"pixel_values", "image_id", "file"}``.

    Args:
        items: What to caption.
        image_size: Side of the square model input in pixels.
    """

    def __init__(self, items: list[PredictItem], image_size: int) -> None:
        self.items = list(items)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {
            "pixel_values": load_image_uint8(item.path, self.image_size).float().div_(255),
            "image_id": item.image_id,
            "file": str(item.path),
        }


def collate_predict(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a prediction batch.

    Shape:
        ``pixel_values``: ``(B, 3, S, S)`` in [0, 1]; ``image_id`` and ``file``: lists of length ``B``.
    """
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "image_id": [item["image_id"] for item in items],
        "file": [item["file"] for item in items],
    }
