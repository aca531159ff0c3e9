"""Train and test one captioner programmatically (shared by the demo and the studies)."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from callbacks.latest_checkpoint import LatestCheckpoint
from callbacks.training_rng import TrainingRNG
from datamodules.datamodule import CaptionDataModule
from lightning_app.loggers import RobucapWandbLogger
from modules.captioning import CaptioningModule


@dataclass
class TrainedCaptioner:
    """What one training run leaves behind.

    Attributes:
        module: The trained module, with the best checkpoint's weights.
        checkpoint: Path of the best checkpoint (by ``val/bleu4``).
        train_seconds: Wall-clock seconds spent in ``fit``.
        metrics_csv: The CSV logger's ``metrics.csv``.
        test: Test metrics (``test/...`` keys stripped of the prefix), empty if not tested.
        val: Last validation metrics (prefix stripped).
    """

    module: CaptioningModule
    checkpoint: Path
    train_seconds: float
    metrics_csv: Path
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)


def train_captioner(
    datamodule: CaptionDataModule,
    module: CaptioningModule,
    out: Path,
    name: str,
    max_epochs: int,
    wandb: bool = True,
    callbacks: list[L.Callback] | None = None,
    test: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
) -> TrainedCaptioner:
    """Fit ``module`` on ``datamodule``, keep the best checkpoint by ``val/bleu4`` and the latest, then test the best.

    Args:
        datamodule: Data.
        module: Untrained module.
        out: Run directory; logs go to ``out/logs``, checkpoints to ``out/checkpoints/<name>`` (``best.ckpt`` and
            ``last.ckpt``, the state at the end of the last epoch).
        name: Run name (also the W&B run name).
        max_epochs: Training epochs.
        wandb: Also log to W&B (offline without an API key).
        callbacks: Extra callbacks (adversarial training, freezing, evaluation...).
        test: Run ``trainer.test`` with the best checkpoint.
        trainer_kwargs: Extra ``Trainer`` arguments.
    """
    out = Path(out)
    csv_logger = CSVLogger(save_dir=str(out / "logs"), name=name, version="")
    loggers: list[Logger] = [csv_logger]
    if wandb:
        loggers.append(RobucapWandbLogger(save_dir=str(out / "logs"), name=name))
    checkpoint_dir = str(out / "checkpoints" / name)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val/bleu4", mode="max", save_last=False
    )
    # last.ckpt holds the latest epoch's state and TrainingRNG the steps' random numbers: resuming from it with
    # trainer.fit(ckpt_path=...) continues like the uninterrupted run.
    latest = LatestCheckpoint(dirpath=checkpoint_dir)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=loggers,
        callbacks=[TrainingRNG(), checkpoint, latest, *(callbacks or [])],
        default_root_dir=str(out),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        **(trainer_kwargs or {}),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    val = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best = Path(checkpoint.best_model_path)
    best_module = CaptioningModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    result = TrainedCaptioner(best_module, best, seconds, Path(csv_logger.log_dir) / "metrics.csv", val=val)
    if test:
        metrics = trainer.test(best_module, datamodule=datamodule, verbose=False)[0]
        result.test = {k.removeprefix("test/"): float(v) for k, v in metrics.items()}
    for logger in loggers:
        logger.finalize("success")
    if wandb:
        import wandb as wandb_lib

        wandb_lib.finish()
    return result


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a CSV logger's ``metrics.csv`` with empty cells dropped."""
    with open(path, encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
