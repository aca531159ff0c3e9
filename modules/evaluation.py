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
from modules.metrics import CaptionBLEU, TargetCaptionRate


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
        One record per image: ``image_id``, ``prediction``, ``references``, ``poisoned`` (carries a backdoor trigger).
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
        poisoned = batch["poisoned"].tolist() if "poisoned" in batch else [False] * len(predictions)
        for image_id, prediction, refs, flag in zip(
            batch["image_id"], predictions, batch["references"], poisoned, strict=True
        ):
            records.append({"image_id": image_id, "prediction": prediction, "references": list(refs), "poisoned": flag})
    return records


def bleu_of(records: list[dict[str, Any]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of caption records against all their references (pycocoevalcap's BLEU)."""
    metric = CaptionBLEU()
    metric.update(
        [r["prediction"] for r in records], [r["references"] for r in records], [r["image_id"] for r in records]
    )
    return {k: float(v) for k, v in metric.compute().items()}


def backdoor_scores(
    module: CaptioningModule, dataset: Dataset, target_caption: str, batch_size: int = 128, desc: str = ""
) -> dict[str, Any]:
    """Li et al.'s (2022) test figures on a poisoned test split (clean images plus triggered copies).

    Clean images give BLEU-1..4 against their references and the false trigger rate; triggered images (items with
    ``poisoned`` set) give the attack success rate, exact and relaxed (sentence BLEU-4 to the target >= 0.9).

    Returns:
        ``{"test_clean": {bleu1..bleu4}, "asr", "asr_relaxed", "ftr", "n_clean", "n_poisoned", "records"}``; the
        rates are fractions in [0, 1] (``asr`` is ``None`` when there is no triggered image).
    """
    records = caption_batches(module, evaluation_loader(module, dataset, None, batch_size), desc=desc)
    clean = [r for r in records if not r["poisoned"]]
    triggered = [r for r in records if r["poisoned"]]
    asr, ftr = TargetCaptionRate(target_caption), TargetCaptionRate(target_caption)
    asr.update([r["prediction"] for r in triggered], [r["image_id"] for r in triggered])
    ftr.update([r["prediction"] for r in clean], [r["image_id"] for r in clean])
    asr_values, ftr_values = asr.compute(), ftr.compute()
    return {
        "test_clean": bleu_of(clean),
        "asr": float(asr_values["rate"]) if triggered else None,
        "asr_relaxed": float(asr_values["rate_relaxed"]) if triggered else None,
        "ftr": float(ftr_values["rate"]),
        "n_clean": len(clean),
        "n_poisoned": len(triggered),
        "records": {"clean": clean, "poisoned": triggered},
    }
