"""What the part-pretraining modules share: optimiser and schedule, checkpoint marker, and the export of the trained
part as a ``save_pretrained`` directory when training ends."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from datamodules.errors import RobucapError
from modules.captioners.vit_gpt2 import PRESETS
from modules.dense import VICTIM_KEY
from modules.schedules import SCHEDULES

__all__ = ["EXPORT_SUBDIR", "PretrainingModule", "check_optimiser_settings", "check_preset"]

EXPORT_SUBDIR = "pretrained"
"""Where a run's part is saved without ``export_dir``: ``<trainer.default_root_dir>/pretrained``."""


def check_optimiser_settings(
    lr: float, weight_decay: float, warmup_steps: int, schedule: str, min_lr_ratio: float
) -> None:
    """Refuse out-of-range optimiser settings.

    Raises:
        RobucapError: Naming the option.
    """
    if lr <= 0:
        raise RobucapError(f"model.init_args.lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise RobucapError(f"model.init_args.weight_decay must be >= 0, got {weight_decay}")
    if warmup_steps < 0:
        raise RobucapError(f"model.init_args.warmup_steps must be >= 0, got {warmup_steps}")
    if schedule not in SCHEDULES:
        raise RobucapError(f"model.init_args.schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if not 0 <= min_lr_ratio <= 1:
        raise RobucapError(f"model.init_args.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def check_preset(preset: str) -> None:
    """Refuse a captioner preset without a random-init config (``pretrained`` is what these modules make).

    Raises:
        RobucapError: Naming the option and the presets.
    """
    if preset not in PRESETS:
        raise RobucapError(
            f"model.init_args.preset must be a captioner preset, one of {sorted(PRESETS)}; got {preset!r}"
        )


class PretrainingModule(L.LightningModule, ABC):
    """Base of the pretraining modules: AdamW with warm-up and a schedule, a checkpoint marker naming the module
    kind (read by ``robucap validate --ckpt_path``, like a dense victim's), and :meth:`export` at the end of training.

    Subclasses set :attr:`kind`, call ``save_hyperparameters()`` with ``lr``, ``weight_decay``, ``warmup_steps``,
    ``schedule``, ``min_lr_ratio`` and ``export_dir`` among their arguments, and implement :meth:`save_pretrained`.
    """

    kind: ClassVar[str] = ""

    def export_path(self) -> Path:
        """``export_dir``, or ``<trainer.default_root_dir>/pretrained``."""
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / EXPORT_SUBDIR

    @abstractmethod
    def save_pretrained(self, directory: Path) -> None:
        """Write the trained part (and what loading it needs) with ``save_pretrained`` into ``directory``."""

    def export(self, directory: Path) -> Path:
        """Save the part into ``directory`` (created; files of an earlier export there are replaced).

        Raises:
            RobucapError: ``directory`` is a file.
        """
        if directory.exists() and not directory.is_dir():
            raise RobucapError(f"model.init_args.export_dir {directory} is a file; expected a directory")
        directory.mkdir(parents=True, exist_ok=True)
        self.save_pretrained(directory)
        return directory

    def on_train_end(self) -> None:
        """Export the final weights (rank 0 only) and say where."""
        if not self.trainer.is_global_zero:
            return
        out = self.export(self.export_path())
        print(f"robucap: pretrained {self.kind.split('_')[0]} saved to {out}", file=sys.stderr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[VICTIM_KEY] = {"victim": self.kind, "class_path": f"{cls.__module__}.{cls.__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        marker = checkpoint.get(VICTIM_KEY)
        if not isinstance(marker, Mapping) or marker.get("victim") != self.kind:
            found = marker.get("victim") if isinstance(marker, Mapping) else "no pretraining module (a captioner?)"
            raise RobucapError(f"this checkpoint holds {found}, not {self.kind}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        schedule = SCHEDULES[hp.schedule]
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_lr(self) -> None:
        """Log the learning rate (here rather than by LearningRateMonitor, which refuses to run without a logger)."""
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
