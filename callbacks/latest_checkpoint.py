"""``last.ckpt``: the latest state of a run, written at the end of every epoch and optionally every N steps.

Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when it also writes a
monitored checkpoint, i.e. after a validation that improved the metric: with validation every 10 epochs and no
improvement after epoch 9, a 60-epoch run leaves ``last.ckpt`` at epoch 9. :class:`LatestCheckpoint` owns
``last.ckpt`` instead; the monitored checkpoint (``best.ckpt``) runs next to it with ``save_last: false``.
"""

from __future__ import annotations

import os
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn

from datamodules.errors import RobucapError

__all__ = ["LatestCheckpoint"]


class LatestCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` at the latest state of training.

    Writes ``<dirpath>/last.ckpt`` at the end of every training epoch (after that epoch's validation, whatever
    ``check_val_every_n_epoch`` is) and, with ``every_n_train_steps``, also every N optimizer steps, so a run killed
    mid-epoch can resume from ``--ckpt_path .../last.ckpt`` and lose at most N steps. It monitors nothing and keeps no
    other file. The name is always ``last.ckpt`` (no ``-v1`` versions): the file is the latest state of the latest run
    that wrote into the directory.

    A local ``last.ckpt`` is replaced atomically (written next to it under a temporary name, then renamed), so a
    kill during the write leaves the previous one intact.

    Args:
        dirpath: Directory; ``None`` is ``ModelCheckpoint``'s default (the first logger's ``.../checkpoints``), the
            directory a ``ModelCheckpoint`` without ``dirpath`` on the same Trainer uses.
        every_n_train_steps: Also save every N optimizer steps (0: only at epoch ends).

    Raises:
        RobucapError: ``every_n_train_steps`` is negative or not an integer.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int):
            raise RobucapError(
                f"LatestCheckpoint every_n_train_steps must be an integer >= 0, got {every_n_train_steps!r}"
            )
        if every_n_train_steps < 0:
            raise RobucapError(f"LatestCheckpoint every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=0,  # the epoch-end save is on_train_epoch_end below, not ModelCheckpoint's top-k trigger
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint writes "last" here only if it also wrote a top-k file at this step; this callback keeps
        # none, and must write even when a step checkpoint already holds this global step: the epoch-end state has
        # the finished epoch and its validation in it.
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Single-file strategies only: sharded ones (FSDP, DeepSpeed) write directories, left to ModelCheckpoint.
        single_file = isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy)
        if not single_file or not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        final = Path(filepath)
        partial = final.with_name(f".{final.name}.partial")
        trainer.save_checkpoint(partial, self.save_weights_only)  # writes on global rank 0, all ranks take part
        if trainer.is_global_zero:
            os.replace(partial, final)
        trainer.strategy.barrier("LatestCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
