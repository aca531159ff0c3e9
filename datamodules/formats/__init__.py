"""Loaders for the caption dataset formats, all producing :class:`~datamodules.records.ImageRecord` lists.

=============  ===============================================================================
format         layout
=============  ===============================================================================
``coco``       native COCO captions (``annotations/captions_{split}.json``, optional instances)
``shapes``     ``coco`` with the generated shapes layout defaults (:data:`SHAPES_DEFAULTS`)
``karpathy``   Karpathy splits ``dataset_{flickr8k,flickr30k,coco}.json``
``flickr8k``   the official Flickr8k text files (``Flickr8k.token.txt`` and split lists)
``folder``     your own images with ``captions.jsonl``
=============  ===============================================================================

Every loader takes ``(root, split, **options)`` with ``split`` in ``train``, ``val``, ``test``, returns the
split's records sorted by image id with all reference captions (stripped), checks that every image exists
inside its image root, and never writes under ``root``. Bad input raises one
:class:`~datamodules.errors.DataError` naming the file and what was expected.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datamodules.errors import DataError
from datamodules.formats._common import SPLITS
from datamodules.formats.coco import load_coco
from datamodules.formats.flickr8k import load_flickr8k
from datamodules.formats.folder import assign_split, load_folder
from datamodules.formats.karpathy import load_karpathy
from datamodules.records import ImageRecord

__all__ = [
    "FORMATS",
    "SHAPES_DEFAULTS",
    "SPLITS",
    "FormatLoader",
    "assign_split",
    "load_coco",
    "load_flickr8k",
    "load_folder",
    "load_karpathy",
    "load_shapes",
    "load_split",
]

FormatLoader = Callable[..., list[ImageRecord]]

# The generated shapes data is written in COCO format with this layout; keep it in step with the generator.
SHAPES_DEFAULTS: dict[str, Any] = {
    "captions_file": "annotations/captions_{split}.json",
    "image_dir": "images/{split}",
    "instances_file": None,
}


def load_shapes(root: str | Path, split: str, **options: Any) -> list[ImageRecord]:
    """Load a split of the generated shapes data: :func:`load_coco` with :data:`SHAPES_DEFAULTS`.

    Args:
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        **options: :func:`load_coco` options overriding the shapes defaults.

    Returns:
        The split's records (with the shapes' boxes when the instances file is present).
    """
    return load_coco(root, split, **{**SHAPES_DEFAULTS, **options})


FORMATS: dict[str, FormatLoader] = {
    "coco": load_coco,
    "karpathy": load_karpathy,
    "flickr8k": load_flickr8k,
    "folder": load_folder,
    "shapes": load_shapes,
}


def load_split(format: str, root: str | Path, split: str, **options: Any) -> list[ImageRecord]:
    """Load one split of a dataset in a registered format.

    Args:
        format: A key of :data:`FORMATS` (``coco``, ``karpathy``, ``flickr8k``, ``folder``, ``shapes``).
        root: Dataset root directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        **options: Format-specific options (see each ``load_<format>``).

    Returns:
        The split's records sorted by image id, each with all its reference captions.

    Raises:
        DataError: On an unknown format, split or option, or any problem with the dataset files.
    """
    loader = FORMATS.get(format)
    if loader is None:
        raise DataError(f"unknown dataset format {format!r}; expected one of {', '.join(sorted(FORMATS))}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for the {format} format; expected one of {', '.join(SPLITS)}")
    allowed = _option_names(load_coco if loader is load_shapes else loader)
    unknown = sorted(set(options) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) or "none"
        raise DataError(f"unknown option {unknown[0]!r} for the {format} dataset format; expected one of: {expected}")
    return loader(root, split, **options)


def _option_names(loader: FormatLoader) -> set[str]:
    return {p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY}
