"""Freeze the vision encoder or the language decoder of a captioner for a whole fit (Rashid & Rivas 2024, phases 4-5).

Built on Lightning's :class:`~lightning.pytorch.callbacks.BaseFinetuning`: the part is frozen before the optimizer is
configured and never unfrozen. :class:`~modules.captioning.CaptioningModule` leaves parameters with
``requires_grad=False`` out of its AdamW optimizer, so frozen weights get neither updates nor weight decay and end a
fit bitwise unchanged.

Hook order (Lightning 2.6): ``Callback.setup`` → ``LightningModule.setup`` → ``configure_model`` → DDP wrapping and
``configure_optimizers`` → ``on_fit_start``. ``BaseFinetuning`` freezes in ``Callback.setup``, but a
``CaptioningModule`` built by the Trainer (CLI runs) only gets its captioner in ``configure_model``, after that hook.
So the callback asks the module to freeze the part (:meth:`~modules.captioning.CaptioningModule.freeze_part`): the
module freezes it at once if the captioner exists, else right after building it in ``configure_model``, which still
precedes both the DDP wrapper (it must only see trainable parameters) and the optimizer. Nothing on the module is
replaced or patched.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from datamodules.errors import RobucapError

__all__ = ["FreezeDecoder", "FreezeEncoder", "parameter_counts"]


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (elements, not tensors).

    Returns:
        ``{"train/trainable_params": ..., "train/frozen_params": ...}``.
    """
    trainable = frozen = 0
    for param in module.parameters():
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return {"train/trainable_params": trainable, "train/frozen_params": frozen}


class _FreezePart(BaseFinetuning):
    """Freeze ``pl_module.captioner.<part>`` before training and keep it frozen.

    Args:
        train_bn: Leave BatchNorm layers of the frozen part trainable (Lightning's convention). The default
            ``False`` freezes them too and stops their running statistics, so the part is entirely fixed.
    """

    part: str = ""

    def __init__(self, train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn
        self.param_counts: dict[str, int] = {}

    # -- BaseFinetuning -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check_not_both(trainer)
        if not callable(getattr(pl_module, "freeze_part", None)):
            raise RobucapError(
                f"{type(self).__name__} needs a LightningModule with a `captioner` (CaptioningModule), "
                f"got {type(pl_module).__name__}"
            )
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Ask the module to freeze the part, now or as soon as it builds its captioner (see the module docstring)."""
        pl_module.freeze_part(self.part, train_bn=self.train_bn, requested_by=type(self).__name__)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Nothing to do: the part stays frozen for the whole fit."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.param_counts = parameter_counts(pl_module)
        trainable = self.param_counts["train/trainable_params"]
        frozen = self.param_counts["train/frozen_params"]
        rank_zero_info(f"{type(self).__name__}: {trainable:,} trainable and {frozen:,} frozen parameters")
        # self.log is not allowed in on_fit_start; the counts are constants of the run, logged once.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(self.param_counts), step=trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The request belongs to this fit: a later fit of the same module without the callback must not inherit it
        # (parameters frozen during this fit stay frozen, as with BaseFinetuning).
        frozen_parts = getattr(pl_module, "frozen_parts", None)
        if isinstance(frozen_parts, dict):
            frozen_parts.pop(self.part, None)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _check_not_both(self, trainer: L.Trainer) -> None:
        parts = {cb.part for cb in trainer.callbacks if isinstance(cb, _FreezePart)}
        if {"encoder", "decoder"} <= parts:
            raise RobucapError(
                "FreezeEncoder and FreezeDecoder together would freeze the whole captioner and leave nothing to "
                "train; use one of them (Rashid & Rivas 2024: freeze the ViT encoder, or the GPT-2 decoder)"
            )


class FreezeEncoder(_FreezePart):
    """Freeze the vision encoder and train the language decoder only (Rashid & Rivas 2024, phase 4: "freezing ViT").

    For ViT-GPT2 the frozen part is ``captioner.encoder`` (the ViT); GPT-2, its cross-attention layers and the
    encoder-to-decoder projection (present when the hidden sizes differ) stay trainable.

    Frozen parameters are left out of the optimizer, so they end the fit bitwise unchanged (no AdamW weight decay).
    At fit start the parameter counts are printed and logged as ``train/trainable_params`` and
    ``train/frozen_params`` (also kept in :attr:`param_counts`).

    Args:
        train_bn: Keep BatchNorm layers of the encoder trainable (default ``False``: frozen too).

    Raises:
        RobucapError: At setup, with :class:`FreezeDecoder` in the same Trainer, or when the captioner has no encoder.

    Example:
        ``robucap fit ... --trainer.callbacks+=callbacks.FreezeEncoder``
    """

    part = "encoder"


class FreezeDecoder(_FreezePart):
    """Freeze the language decoder and train the vision encoder only (Rashid & Rivas 2024, phase 5: "freezing GPT").

    For ViT-GPT2 the frozen part is ``captioner.decoder``: all of GPT-2 including its cross-attention layers and LM
    head, plus the encoder-to-decoder projection (``enc_to_dec_proj``) when the model has one.

    Frozen parameters are left out of the optimizer, so they end the fit bitwise unchanged (no AdamW weight decay).
    At fit start the parameter counts are printed and logged as ``train/trainable_params`` and
    ``train/frozen_params`` (also kept in :attr:`param_counts`).

    Args:
        train_bn: Keep BatchNorm layers of the decoder trainable (default ``False``: frozen too).

    Raises:
        RobucapError: At setup, with :class:`FreezeEncoder` in the same Trainer, or when the captioner has no decoder.
    """

    part = "decoder"
