"""Score captioned datasets: the evaluation loader, corpus BLEU of records, Li et al.'s (2022) backdoor figures.

Captioning itself (clean or under an attack) is :func:`modules.captions.caption_batches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.collate import CaptionCollator
from modules.captioning import CaptioningModule
from modules.captions import caption_batches
from modules.metrics import CaptionBLEU, TargetCaptionRate
from modules.records import CaptionedImage, records_to_json


def evaluation_loader(
    module: CaptioningModule, dataset: Dataset, max_images: int | None, batch_size: int
) -> DataLoader:
    """A loader over the first ``max_images`` images of an evaluation dataset (unique images with references)."""
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=CaptionCollator(module.tokenizer))


def bleu_of(records: Sequence[CaptionedImage]) -> dict[str, float]:
    """Corpus BLEU-1..4 of caption records' predictions against all their references (pycocoevalcap's BLEU)."""
    metric = CaptionBLEU()
    metric.update([r.prediction for r in records], [r.references for r in records], [r.image_id for r in records])
    return {k: float(v) for k, v in metric.compute().items()}


def backdoor_scores(
    module: CaptioningModule, dataset: Dataset, target_caption: str, batch_size: int = 128, desc: str = ""
) -> dict[str, Any]:
    """Li et al.'s (2022) test figures on a poisoned test split (clean images plus triggered copies).

    Clean images give BLEU-1..4 against their references and the false trigger rate; triggered images (items with
    ``poisoned`` set) give the attack success rate, exact and relaxed (sentence BLEU-4 to the target >= 0.9).

    Returns:
        ``{"test_clean": {bleu1..bleu4}, "asr", "asr_relaxed", "ftr", "n_clean", "n_poisoned", "records"}``; the
        rates are fractions in [0, 1] (``asr`` is ``None`` when there is no triggered image); ``records`` holds the
        clean and the triggered images' records as JSON.
    """
    records = caption_batches(module, evaluation_loader(module, dataset, None, batch_size), desc=desc)
    clean = [r for r in records if not r.poisoned]
    triggered = [r for r in records if r.poisoned]
    asr, ftr = TargetCaptionRate(target_caption), TargetCaptionRate(target_caption)
    asr.update([r.prediction for r in triggered], [r.image_id for r in triggered])
    ftr.update([r.prediction for r in clean], [r.image_id for r in clean])
    asr_values, ftr_values = asr.compute(), ftr.compute()
    return {
        "test_clean": bleu_of(clean),
        "asr": float(asr_values["rate"]) if triggered else None,
        "asr_relaxed": float(asr_values["rate_relaxed"]) if triggered else None,
        "ftr": float(ftr_values["rate"]),
        "n_clean": len(clean),
        "n_poisoned": len(triggered),
        "records": {"clean": records_to_json(clean), "poisoned": records_to_json(triggered)},
    }
