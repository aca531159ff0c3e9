"""The format-independent view of a captioning split that every loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Box:
    """One object region in pixel coordinates of the *source* image.

    Attributes:
        x: Left edge.
        y: Top edge.
        w: Width.
        h: Height.
        category: Category name (for example ``"circle"``), or ``""`` when unknown.
    """

    x: float
    y: float
    w: float
    h: float
    category: str = ""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split with all its reference captions.

    Attributes:
        image_id: Unique id of the image within its dataset (int for COCO, file name for Flickr).
        path: Absolute path of the image file; loaders guarantee it lies inside the image root.
        captions: All reference captions, raw text, each non-empty.
        boxes: Object regions when the format carries them (COCO ``instances_*.json``), else empty.
        width: Source image width in pixels when known from the annotations, else 0.
        height: Source image height in pixels when known from the annotations, else 0.
        poisoned: The image carries a backdoor trigger (and its captions are the attacker's target).
    """

    image_id: int | str
    path: Path
    captions: tuple[str, ...]
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    width: int = 0
    height: int = 0
    poisoned: bool = False
