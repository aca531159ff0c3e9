"""The typed record of one captioned image, shared from ``modules/`` to the app's ``results.json``.

Every evaluation in robucap ends in a list of captioned images: a clean test set (id, prediction, references), an
untargeted attack (plus the clean caption, whether it changed and the distortion) or a targeted one (plus the target
and whether it was met). One dataclass carries them all, so the app renders fields, not dictionary keys agreed by
convention; :meth:`CaptionedImage.to_json` writes only the fields a run filled in.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["CaptionedImage", "Target", "records_to_json"]

Target = str | list[str]
"""A target caption, or a list of target keywords (Show-and-Fool's keyword attack, Chen et al. 2018)."""


@dataclass
class CaptionedImage:
    """One image, the caption a captioner gave it, and what an attack (if any) made of it.

    Distances are in [0, 1] pixel units except ``rmsd``, which is on the 0-255 scale (Liu et al. 2017).

    Attributes:
        image_id: The dataset's id of the image.
        prediction: The captioner's caption of the image evaluated (the adversarial one under attack).
        references: The dataset's reference captions.
        clean: The captioner's caption of the clean image, where the prediction is of an attacked one.
        target: The attack's goal: a caption or keywords (targeted attacks only).
        target_caption: The caption the target keywords were taken from (Show-and-Fool's keyword mode).
        success: Whether the prediction meets the target (targeted attacks only).
        changed: Whether the prediction differs from ``clean`` (normalised text).
        l2: ``||adversarial - clean||_2``.
        linf: ``max |adversarial - clean|``.
        rmsd: Root-mean-square deviation on the 0-255 scale.
        c: Show-and-Fool's final trade-off constant.
        iterations: Gradient evaluations the attack spent on the image.
        index: Position of the image in the set it was drawn from (to find its pixels again).
        poisoned: The image carries a backdoor trigger.
    """

    image_id: Hashable
    prediction: str
    references: list[str]
    clean: str | None = None
    target: Target | None = None
    target_caption: str | None = None
    success: bool | None = None
    changed: bool | None = None
    l2: float | None = None
    linf: float | None = None
    rmsd: float | None = None
    c: float | None = None
    iterations: int | None = None
    index: int | None = None
    poisoned: bool = False

    def to_json(self) -> dict[str, Any]:
        """The filled-in fields as a JSON-ready dict (``None`` fields and an unset ``poisoned`` are left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "poisoned" and not value):
                continue
            out[f.name] = list(value) if isinstance(value, list | tuple) else value
        return out


def records_to_json(records: Sequence[CaptionedImage]) -> list[dict[str, Any]]:
    """:meth:`CaptionedImage.to_json` of every record, in order."""
    return [r.to_json() for r in records]
