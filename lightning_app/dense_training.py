"""Train and test one dense victim (a detector or a segmenter) programmatically, as ``robucap fit`` would.

The same callbacks as ``configs/defaults_<victim>.yaml`` (best checkpoint by the victim's validation metric, the
latest state, the steps' random numbers) and the same loggers as the captioners' runs (CSV, and W&B offline without
an API key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from callbacks.latest_checkpoint import LatestCheckpoint
from callbacks.training_rng import TrainingRNG
from datamodules.instances import InstancesDataModule
from lightning_app.loggers import RobucapWandbLogger
from modules.dense import DenseVictimModule

__all__ = ["MONITORS", "TrainedVictim", "train_victim"]

MONITORS: dict[str, str] = {"detector": "val/map50", "segmenter": "val/miou"}
"""The validation metric each victim's best checkpoint maximises (as ``configs/defaults_<victim>.yaml``)."""


@dataclass
class TrainedVictim:
    """What one training run of a dense victim leaves behind.

    Attributes:
        module: The module with the best checkpoint's weights, in eval mode.
        checkpoint: Path of the best checkpoint.
        train_seconds: Wall-clock seconds spent in ``fit``.
        test: Test metrics of the best checkpoint, ``test/`` stripped (``map50``, ``map`` or ``miou``).
    """

    module: DenseVictimModule
    checkpoint: Path
    train_seconds: float
    test: dict[str, float] = field(default_factory=dict)


def train_victim(
    datamodule: InstancesDataModule,
    module: DenseVictimModule,
    out: Path,
    name: str,
    max_epochs: int,
    wandb: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
) -> TrainedVictim:
    """Fit ``module``, keep its best checkpoint by the victim's validation metric, then test that checkpoint.

    Args:
        datamodule: The instances data (its ``image_size`` must be the module's).
        module: The untrained detector or segmenter.
        out: Run directory: logs under ``out/logs``, checkpoints under ``out/checkpoints/<name>``.
        name: Run name (also the W&B run's).
        max_epochs: Training epochs.
        wandb: Also log to W&B (offline without an API key).
        trainer_kwargs: Extra ``Trainer`` arguments.
    """
    out = Path(out)
    loggers: list[Logger] = [CSVLogger(save_dir=str(out / "logs"), name=name, version="")]
    if wandb:
        loggers.append(RobucapWandbLogger(save_dir=str(out / "logs"), name=name))
    directory = str(out / "checkpoints" / name)
    best = ModelCheckpoint(dirpath=directory, filename="best", monitor=MONITORS[module.victim], mode="max")
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=loggers,
        callbacks=[TrainingRNG(), best, LatestCheckpoint(dirpath=directory)],
        default_root_dir=str(out),
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **(trainer_kwargs or {}),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    path = Path(best.best_model_path)
    trained = type(module).load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    metrics = trainer.test(trained, datamodule=datamodule, verbose=False)[0]
    for logger in loggers:
        logger.finalize("success")
    if wandb:
        import wandb as wandb_lib

        wandb_lib.finish()
    test = {k.removeprefix("test/"): float(v) for k, v in metrics.items() if k.startswith("test/")}
    return TrainedVictim(trained.eval(), path, seconds, test)
