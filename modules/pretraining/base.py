"""What the part-pretraining modules share: optimiser and schedule, checkpoint marker, and the export of the trained
part as a ``save_pretrained`` directory when training ends."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from datamodules.errors import RobucapError
from modules.captioners.vit_gpt2 import PRESETS
from modules.marked_module import MarkedModule
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


class PretrainingModule(MarkedModule, ABC):
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

    def marker_kind(self) -> str:
        """The kind written into the checkpoint."""
        return self.kind

    def marker_missing(self) -> str:
        """A checkpoint without the marker."""
        return "no pretraining module (a captioner?)"
