"""What robucap's non-captioner LightningModules share: a checkpoint marker naming their kind, AdamW with warm-up
and a schedule, and the learning-rate log.

The marker (:data:`VICTIM_KEY` in the checkpoint: ``{"victim": <kind>, "class_path": ...}``) lets ``robucap
validate --ckpt_path`` and the attacks tell a detector, a segmenter or a pretraining module from a captioner without
building a model (:func:`modules.dense.read_victim`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from datamodules.errors import RobucapError
from modules.schedules import SCHEDULES

__all__ = ["VICTIM_KEY", "MarkedModule"]

VICTIM_KEY = "robucap_victim"


class MarkedModule(L.LightningModule):
    """A module whose checkpoints say what they hold, trained with AdamW, warm-up and a schedule.

    Subclasses say what they are (:meth:`marker_kind`, :meth:`marker_expected`, :meth:`marker_missing`) and call
    ``save_hyperparameters()`` with ``lr``, ``weight_decay``, ``warmup_steps``, ``schedule`` and ``min_lr_ratio``
    among their arguments.
    """

    def marker_kind(self) -> str:
        """The kind written into the checkpoint (``detector``, ``encoder_pretraining``...)."""
        raise NotImplementedError

    def marker_expected(self) -> str:
        """How an error names the kind this module expects (``a detector``)."""
        return self.marker_kind()

    def marker_missing(self) -> str:
        """How an error names a checkpoint without a marker."""
        return "no marked module (a captioner?)"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[VICTIM_KEY] = {"victim": self.marker_kind(), "class_path": f"{cls.__module__}.{cls.__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        marker = checkpoint.get(VICTIM_KEY)
        if not isinstance(marker, Mapping) or marker.get("victim") != self.marker_kind():
            found = marker.get("victim") if isinstance(marker, Mapping) else self.marker_missing()
            raise RobucapError(f"this checkpoint holds {found}, not {self.marker_expected()}")

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
