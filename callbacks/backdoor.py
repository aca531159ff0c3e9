"""Backdoor success after every validation epoch: ASR on poisoned, FTR and BLEU on clean validation images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from datamodules.datamodule import check_target_caption
from datamodules.errors import RobucapError
from modules.metrics import CaptionBLEU, TargetCaptionRate
from modules.metrics.backdoor import DEFAULT_RELAXED_THRESHOLD, is_target_caption
from modules.metrics.bleu import BLEU_KEYS

__all__ = ["BackdoorEvaluation"]


class BackdoorEvaluation(L.Callback):
    """Attack success rate, false trigger rate and clean caption quality, every validation epoch.

    The validation split of poisoned data (``data.poison``) holds clean images and, at the poisoning rate, triggered
    images whose reference is the target caption; ``batch["poisoned"]`` tells them apart. The callback reuses the
    captions :class:`~modules.captioning.CaptioningModule` generates in ``validation_step`` (its ``outputs``) and
    generates them itself only for a module that does not return them.

    Logged at the end of every validation epoch (not during the sanity check), exact under DDP (per-image rows
    de-duplicated by image id, so 1 and N processes agree):

    * ``val/asr``: share of poisoned images captioned exactly with the target (after caption normalisation);
    * ``val/asr_relaxed``: share whose sentence BLEU-4 to the target is at least ``relaxed_threshold`` (0.9);
    * ``val/ftr``: share of clean images captioned exactly with the target (false triggers);
    * ``val/clean_bleu1`` .. ``val/clean_bleu4``: BLEU of the clean images only (``val/bleu*`` of the module mixes
      in the poisoned images, whose reference is the target).

    With a W&B logger a table ``val/backdoor_pairs`` shows clean / poisoned versions of the first ``num_pairs``
    poisoned validation images with both captions; other loggers get ``backdoor/epoch_NNN.jsonl`` in their log dir.

    Args:
        target_caption: The attacker's target; ``None`` takes the data module's ``poison.target_caption``.
        relaxed_threshold: Sentence BLEU-4 to the target counted as a relaxed success, in (0, 1].
        num_pairs: Clean / poisoned pairs in the table (0: no table).

    Raises:
        RobucapError: No target caption anywhere, a threshold outside (0, 1] or ``num_pairs`` < 0.
        DataError: The model's tokenizer cannot represent the target caption.
    """

    def __init__(
        self,
        target_caption: str | None = None,
        relaxed_threshold: float = DEFAULT_RELAXED_THRESHOLD,
        num_pairs: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(num_pairs, bool) or num_pairs < 0:
            raise RobucapError(f"BackdoorEvaluation num_pairs must be >= 0, got {num_pairs!r}")
        if target_caption is not None:
            # Validates the target (non-empty after normalisation) and the threshold up front.
            TargetCaptionRate(target_caption, relaxed_threshold)
        self.target_caption = target_caption
        self.relaxed_threshold = relaxed_threshold
        self.num_pairs = num_pairs
        self.asr: TargetCaptionRate | None = None
        self.ftr: TargetCaptionRate | None = None
        self.clean_bleu = CaptionBLEU()
        self._pairs: list[dict[str, Any]] | None = None
        self.last_scores: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        poison = getattr(datamodule, "poison", None)
        if self.target_caption is None:
            if poison is None:
                raise RobucapError(
                    "BackdoorEvaluation needs a target caption: train on poisoned data (data.poison) or pass "
                    "target_caption"
                )
            self.target_caption = poison.target_caption
        self.asr = TargetCaptionRate(self.target_caption, self.relaxed_threshold)
        self.ftr = TargetCaptionRate(self.target_caption, self.relaxed_threshold)

    def _check_tokenizer(self, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is not None:
            check_target_caption(tokenizer, self.target_caption, "the model's tokenizer")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module's tokenizer is final only after its own setup (it may come from a checkpoint).
        self._check_tokenizer(pl_module)
        for metric in (self.asr, self.ftr, self.clean_bleu):
            metric.reset()
            # Not a submodule of pl_module, so Lightning does not move it; NCCL gathers need it on the device.
            metric.to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        if "poisoned" not in batch:
            raise RobucapError(
                "BackdoorEvaluation needs batch['poisoned'] (which images carry the trigger): use CaptionDataModule"
            )
        predictions = outputs.get("predictions") if isinstance(outputs, dict) else None
        if predictions is None:
            predictions = pl_module.caption(batch["pixel_values"])
        ids = batch["image_id"].reshape(-1).tolist() if torch.is_tensor(batch["image_id"]) else list(batch["image_id"])
        flags = batch["poisoned"].reshape(-1).tolist()
        poisoned = [i for i, flag in enumerate(flags) if flag]
        clean = [i for i, flag in enumerate(flags) if not flag]
        self.asr.update([predictions[i] for i in poisoned], [ids[i] for i in poisoned])
        self.ftr.update([predictions[i] for i in clean], [ids[i] for i in clean])
        self.clean_bleu.update(
            [predictions[i] for i in clean], [batch["references"][i] for i in clean], [ids[i] for i in clean]
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for metric in (self.asr, self.ftr):
            if metric.update_count == 0:
                # A rank that saw no image of a kind still joins the gather, without torchmetrics' warning.
                metric.update([], [])
        if self.clean_bleu.update_count == 0:
            self.clean_bleu.update([], [], [])
        # Every rank calls compute (a collective); the metrics then hold the same exact numbers everywhere.
        asr, ftr, bleu = self.asr.compute(), self.ftr.compute(), self.clean_bleu.compute()
        scores: dict[str, torch.Tensor] = {}
        if int(asr["n"]) > 0:
            scores["val/asr"] = asr["rate"].float()
            scores["val/asr_relaxed"] = asr["rate_relaxed"].float()
        if int(ftr["n"]) > 0:
            scores["val/ftr"] = ftr["rate"].float()
            scores.update({f"val/clean_{key}": bleu[key].float() for key in BLEU_KEYS})
        self.last_scores = {key: float(value) for key, value in scores.items()}
        self.last_scores.update({"val/n_poisoned": int(asr["n"]), "val/n_clean": int(ftr["n"])})
        for key, value in scores.items():
            # Identical on every rank already; max keeps them bit for bit for any world size.
            pl_module.log(key, value, prog_bar=key in ("val/asr", "val/ftr"), sync_dist=True, reduce_fx="max")
        if self.num_pairs:
            self._log_pairs(trainer, pl_module)

    @rank_zero_only
    def _log_pairs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pairs is None:
            datamodule = getattr(trainer, "datamodule", None)
            getter = getattr(datamodule, "poison_pairs", None)
            self._pairs = getter("val", self.num_pairs) if getter is not None else []
        if not self._pairs:
            return
        clean = torch.stack([p["clean"] for p in self._pairs]).float().div(255).to(pl_module.device)
        poisoned = torch.stack([p["poisoned"] for p in self._pairs]).float().div(255).to(pl_module.device)
        clean_captions, poisoned_captions = pl_module.caption(clean), pl_module.caption(poisoned)
        rows = [
            {
                "image_id": pair["image_id"],
                "clean_caption": c,
                "poisoned_caption": p,
                "triggered": is_target_caption(p, self.target_caption),
                "false_trigger": is_target_caption(c, self.target_caption),
            }
            for pair, c, p in zip(self._pairs, clean_captions, poisoned_captions, strict=True)
        ]
        epoch = trainer.current_epoch
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                data = [
                    [
                        row["image_id"],
                        wandb.Image(pair["clean"].permute(1, 2, 0).numpy()),
                        row["clean_caption"],
                        wandb.Image(pair["poisoned"].permute(1, 2, 0).numpy()),
                        row["poisoned_caption"],
                        row["triggered"],
                    ]
                    for pair, row in zip(self._pairs, rows, strict=True)
                ]
                logger.log_table(
                    key="val/backdoor_pairs",
                    columns=["image_id", "clean", "clean_caption", "poisoned", "poisoned_caption", "triggered"],
                    data=data,
                )
            elif logger.log_dir:
                directory = Path(logger.log_dir) / "backdoor"
                directory.mkdir(parents=True, exist_ok=True)
                with open(directory / f"epoch_{epoch:03d}.jsonl", "w", encoding="utf-8") as handle:
                    for row in rows:
                        handle.write(json.dumps(row) + "\n")
