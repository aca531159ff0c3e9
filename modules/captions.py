"""The one captioning loop: batched captions of images (a tensor, or a loader's batches) in eval mode.

Every evaluation (tests, studies, attacks, transfer tables, Show-and-Fool's clean captions) captions through here,
so decoding (greedy or beam, the caption length), the device and the train/eval mode are handled once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from datamodules.errors import RobucapError
from modules.attacks.protocol import Attack, eval_mode
from modules.captioning import CaptioningModule
from modules.records import CaptionedImage
from modules.victims.captioner import CaptionObjective

__all__ = ["attack_references", "caption_batches", "caption_images"]


def attack_references(
    module: CaptioningModule, attack: Attack, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Adversarial versions of ``images``: ``attack`` white-box against ``module``, untargeted, away from ``labels``.

    Shape:
        ``images``: ``(B, 3, H, W)`` in [0, 1] on the module's device; ``labels``: ``(B, T)`` (a batch's first
        reference caption, -100-padded); returns ``(B, 3, H, W)``.
    """
    return attack(CaptionObjective(module.captioner, labels.to(images.device)), images).adversarial


def caption_images(
    module: CaptioningModule,
    images: torch.Tensor,
    batch_size: int = 64,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Captions of ``images`` by ``module``, ``batch_size`` at a time on the module's device, in eval mode.

    The module's own train/eval flags are restored afterwards (dropout off while captioning).

    Args:
        module: The captioner.
        images: Images in [0, 1].
        batch_size: Images captioned at once.
        num_beams: 1 for greedy decoding; ``None``: the module's setting.
        max_new_tokens: Longest caption; ``None``: the module's setting.

    Shape:
        ``images``: ``(N, 3, H, W)``.

    Raises:
        RobucapError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise RobucapError(f"batch_size must be >= 1, got {batch_size}")
    device = next(module.parameters()).device
    captions: list[str] = []
    with eval_mode(module), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device)
            captions += module.caption(chunk, num_beams=num_beams, max_new_tokens=max_new_tokens)
    return captions


def caption_batches(
    module: CaptioningModule, batches: Iterable[dict[str, Any]], attack: Attack | None = None, desc: str = ""
) -> list[CaptionedImage]:
    """One record per image of a loader's batches, captioned clean or under ``attack``.

    The attack is white-box against ``module``'s current weights and untargeted against each image's first
    reference caption (``batch["labels"]``).

    Args:
        module: The captioner.
        batches: Collated batches with ``pixel_values``, ``labels``, ``image_id``, ``references`` and optionally
            ``poisoned``.
        attack: Caption its adversarial versions of the images instead of the images.
        desc: Progress-bar text; no bar when empty.

    Returns:
        ``image_id``, ``prediction``, ``references`` and ``poisoned`` of every image, in loader order.
    """
    device = next(module.parameters()).device
    records: list[CaptionedImage] = []
    for batch in tqdm(batches, desc=desc or "captioning", leave=False, disable=not desc):
        images = batch["pixel_values"].to(device)
        if attack is not None:
            images = attack_references(module, attack, images, batch["labels"])
        predictions = caption_images(module, images, batch_size=max(1, images.shape[0]))
        poisoned = batch["poisoned"].tolist() if "poisoned" in batch else [False] * len(predictions)
        records += [
            CaptionedImage(image_id=i, prediction=p, references=list(r), poisoned=bool(f))
            for i, p, r, f in zip(batch["image_id"], predictions, batch["references"], poisoned, strict=True)
        ]
    return records
