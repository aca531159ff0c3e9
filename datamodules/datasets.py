"""Torch datasets over :class:`~datamodules.records.ImageRecord` lists.

Training iterates (image, caption) pairs; evaluation iterates unique images with all their references.
Images can be decoded once into a uint8 cache so small datasets (shapes, tests) train without disk reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.images import load_image_uint8
from datamodules.progress import progress_bar
from datamodules.records import ImageRecord


class ImageStore:
    """Decodes images of a split at a fixed size, optionally keeping them in memory as uint8.

    Args:
        records: The split's images.
        image_size: Side of the square output in pixels.
        cache: Decode every image once up front and keep it (uses ``N * 3 * S * S`` bytes).
        progress: Show a progress bar while caching.

    Raises:
        DataError: When caching and an image cannot be decoded (the bar's line is ended first).
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int, cache: bool, progress: bool = False) -> None:
        self.records = list(records)
        self.image_size = image_size
        self._cache: torch.Tensor | None = None
        if cache and self.records:
            images: list[torch.Tensor] = []
            # progress_bar ends the bar's line before a decoding error propagates, so its message starts a line;
            # counting by hand keeps the bar's count exact (the images decoded) when it stops early.
            options = {"total": len(self.records), "desc": "decoding images", "disable": not progress, "leave": False}
            with progress_bar(**options) as bar:
                for record in self.records:
                    images.append(load_image_uint8(record.path, image_size))
                    bar.update()
            self._cache = torch.stack(images)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` as float in [0, 1].

        Shape:
            ``(3, S, S)``.
        """
        if self._cache is not None:
            return self._cache[index].float().div_(255)
        return load_image_uint8(self.records[index].path, self.image_size).float().div_(255)


class CaptionPairs(Dataset):
    """Training view: one item per (image, caption) pair.

    Items are dicts with ``pixel_values`` (3×S×S in [0, 1]), ``caption`` (str), ``image_id`` and ``poisoned``.
    """

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.index = [(i, c) for i, r in enumerate(store.records) for c in range(len(r.captions))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        i, c = self.index[item]
        record = self.store.records[i]
        return {
            "pixel_values": self.store.image(i),
            "caption": record.captions[c],
            "image_id": record.image_id,
            "poisoned": record.poisoned,
        }


class CaptionImages(Dataset):
    """Evaluation view: one item per unique image with all its references.

    Items are dicts with ``pixel_values``, ``references`` (list of str), ``caption`` (the first reference, for the
    teacher-forced loss), ``image_id``, ``file`` (the image path) and ``poisoned``.
    """

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: int) -> dict[str, Any]:
        record = self.store.records[item]
        return {
            "pixel_values": self.store.image(item),
            "caption": record.captions[0],
            "references": list(record.captions),
            "image_id": record.image_id,
            "file": str(record.path),
            "poisoned": record.poisoned,
        }
