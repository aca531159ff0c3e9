"""Caption a dataset (optionally through an attack) and score it: shared by studies and reports."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from datamodules.collate import CaptionCollator
from modules.attacks.base import Attack
from modules.captioning import CaptioningModule
from modules.metrics import CaptionBLEU


def evaluation_loader(
    module: CaptioningModule, dataset: Dataset, max_images: int | None, batch_size: int
) -> DataLoader:
    """A loader over the first ``max_images`` images of an evaluation dataset (unique images with references)."""
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=CaptionCollator(module.tokenizer))


def caption_batches(
    module: CaptioningModule, batches: Iterable[dict[str, Any]], attack: Attack | None = None, desc: str = ""
) -> list[dict[str, Any]]:
    """Generate a caption per image, on clean images or on ``attack``'s adversarial versions.

    The attack is white-box against ``module``'s current weights and untargeted against each image's first
    reference caption (``batch["labels"]``).

    Returns:
        One record per image: ``image_id``, ``prediction``, ``references``.
    """
    module.eval()
    records: list[dict[str, Any]] = []
    device = next(module.parameters()).device
    for batch in tqdm(batches, desc=desc or "captioning", leave=False, disable=not desc):
        images = batch["pixel_values"].to(device)
        if attack is not None:
            images = attack(module.captioner, images, batch["labels"].to(device))
        with torch.no_grad():
            predictions = module.caption(images)
        for image_id, prediction, refs in zip(batch["image_id"], predictions, batch["references"], strict=True):
            records.append({"image_id": image_id, "prediction": prediction, "references": list(refs)})
    return records


def bleu_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of caption records against all their references (pycocoevalcap's BLEU)."""
    metric = CaptionBLEU()
    metric.update(
        [r["prediction"] for r in records], [r["references"] for r in records], [r["image_id"] for r in records]
    )
    return {k: float(v) for k, v in metric.compute().items()}
