"""The freeze study's scores: clean and FGSM BLEU on a training subset and the test split, mean and std over trials."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from datamodules.datamodule import CaptionDataModule
from modules.attacks import FGSM
from modules.captioning import CaptioningModule
from modules.captions import caption_batches
from modules.evaluation import bleu_of, evaluation_loader

if TYPE_CHECKING:
    from lightning_app.studies.freeze import FreezeStudyConfig

__all__ = ["BLEU", "mean_std", "score", "zero_std"]

BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")


def score(module: CaptioningModule, datamodule: CaptionDataModule, cfg: FreezeStudyConfig) -> dict[str, Any]:
    """Clean and FGSM BLEU-1..4 on the training subset and the test split."""
    attack = FGSM(cfg.epsilon)
    result: dict[str, Any] = {}
    train_view = datamodule.eval_dataset("train")
    for split, dataset, limit in (
        ("train", train_view, cfg.train_eval_images),
        ("test", datamodule.datasets["test"], cfg.test_eval_images),
    ):
        loader = evaluation_loader(module, dataset, limit, batch_size=128)
        clean = caption_batches(module, loader)
        adversarial = caption_batches(module, loader, attack=attack)
        result[split] = {"clean": bleu_of(clean), "adversarial": bleu_of(adversarial), "n_images": len(clean)}
    return result


def mean_std(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for split in ("train", "test"):
        mean[split], std[split] = {}, {}
        for kind in ("clean", "adversarial"):
            values = {k: [r["scores"][split][kind][k] for r in runs] for k in BLEU}
            mean[split][kind] = {k: statistics.fmean(v) for k, v in values.items()}
            std[split][kind] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        mean[split]["n_images"] = runs[0]["scores"][split]["n_images"]
    return mean, std


def zero_std() -> dict[str, dict[str, dict[str, float]]]:
    return {s: {k: dict.fromkeys(BLEU, 0.0) for k in ("clean", "adversarial")} for s in ("train", "test")}
