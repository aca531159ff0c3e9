"""The LightningModule that trains and evaluates any :class:`~modules.captioners.Captioner`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerFast

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo, tokenizer_from_state, tokenizer_to_state
from modules.captioners import Captioner, build_captioner
from modules.checkpoint import TOKENIZER_KEY, read_checkpoint_info, same_tokenizer
from modules.metrics import CaptionBLEU, coco_caption_scores, gather_unique
from modules.schedules import SCHEDULES

log = logging.getLogger(__name__)


class CaptioningModule(L.LightningModule):
    """Teacher-forced training, generation-based evaluation.

    The captioner is built in :meth:`configure_model`, once the tokenizer is known (from the data module, or from
    the checkpoint being loaded, which carries its tokenizer as plain JSON).

    Args:
        arch: Captioner architecture (``vit_gpt2`` or ``show_attend_tell``).
        preset: ``tiny``, ``base`` or ``pretrained``.
        image_size: Input side in pixels; the CLI links it to ``data.image_size``.
        pretrained_dir: Full VisionEncoderDecoder directory for ``preset: pretrained``.
        encoder_dir: ViT directory for ``preset: pretrained`` (with ``decoder_dir``).
        decoder_dir: GPT-2 directory for ``preset: pretrained`` (with ``encoder_dir``).
        overrides: Config fields changed in a random-init preset, ``{"encoder": {...}, "decoder": {...}}``.
        encoder_weights: Local torchvision ResNet state_dict for the Show-Attend-Tell encoder.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio`` × lr at the end of training) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for ``cosine``.
        max_new_tokens: Longest generated caption, EOS included.
        num_beams: 1 for greedy decoding, more for beam search.
        num_samples: Validation images kept each epoch (with captions) for logging.
    """

    def __init__(
        self,
        arch: str = "vit_gpt2",
        preset: str = "tiny",
        image_size: int = 64,
        pretrained_dir: str | None = None,
        encoder_dir: str | None = None,
        decoder_dir: str | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        encoder_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.05,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        num_samples: int = 8,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise RobucapError(f"model.lr must be > 0, got {lr}")
        if schedule not in SCHEDULES:
            raise RobucapError(f"model.schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise RobucapError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if num_beams < 1 or max_new_tokens < 1 or warmup_steps < 0:
            raise RobucapError("model.num_beams and model.max_new_tokens must be >= 1, model.warmup_steps >= 0")
        self.save_hyperparameters()
        self.captioner: Captioner | None = None
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.val_bleu = CaptionBLEU()
        self.val_samples: list[dict[str, Any]] = []
        self.test_records: list[dict[str, Any]] = []
        self.test_results: dict[str, Any] = {}

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def with_tokenizer(cls, tokenizer: PreTrainedTokenizerFast, **kwargs: Any) -> CaptioningModule:
        """Build a module and its captioner at once (outside a Trainer, e.g. in scripts and tests)."""
        module = cls(**kwargs)
        module.tokenizer = tokenizer
        module.configure_model()
        return module

    def setup(self, stage: str) -> None:
        """Agree on one tokenizer with the data module: the module's own if it has one, else the data module's.

        A module started from a checkpoint by ``robucap`` already holds the checkpoint's tokenizer here (the CLI reads
        it before the Trainer runs); Lightning restores ``ckpt_path`` only after this hook, and
        :meth:`on_load_checkpoint` then corrects a tokenizer that differs from the checkpoint's.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.tokenizer is None:
            if datamodule is None or getattr(datamodule, "tokenizer", None) is None:
                raise RobucapError(
                    "no tokenizer: use CaptionDataModule, a checkpoint, or CaptioningModule.with_tokenizer"
                )
            self.tokenizer = datamodule.tokenizer
        elif datamodule is not None and hasattr(datamodule, "tokenizer"):
            datamodule.tokenizer = self.tokenizer

    def configure_model(self) -> None:
        # Without a tokenizer (load_from_checkpoint calls this hook first) the build waits for on_load_checkpoint.
        if self.captioner is not None or self.tokenizer is None:
            return
        hp = self.hparams
        # Only show_attend_tell knows encoder_weights; the vit_gpt2 builder keeps its own signature.
        extra = {"encoder_weights": hp.encoder_weights} if hp.arch == "show_attend_tell" else {}
        self.captioner = build_captioner(
            hp.arch,
            VocabInfo.from_tokenizer(self.tokenizer),
            hp.image_size,
            preset=hp.preset,
            pretrained_dir=hp.pretrained_dir,
            encoder_dir=hp.encoder_dir,
            decoder_dir=hp.decoder_dir,
            overrides=hp.overrides,
            **extra,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TOKENIZER_KEY] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's tokenizer: its weights mean nothing with another vocabulary or word order."""
        if TOKENIZER_KEY not in checkpoint:
            raise RobucapError("this checkpoint was not written by robucap's CaptioningModule (no tokenizer inside)")
        saved = tokenizer_from_state(checkpoint[TOKENIZER_KEY])
        if self.tokenizer is not None and not same_tokenizer(self.tokenizer, saved):
            self._adopt_tokenizer(saved)
        self.tokenizer = saved
        self.configure_model()

    def _adopt_tokenizer(self, saved: PreTrainedTokenizerFast) -> None:
        """Rebuild the captioner for a checkpoint whose tokenizer differs from the one the module was set up with.

        Lightning restores ``trainer.validate/test/predict(ckpt_path=...)`` after ``setup``, so the module first
        gets the data's tokenizer; evaluating the checkpoint's weights with it would silently mis-map every word.
        """
        trainer = self._trainer
        if trainer is not None and trainer.training:
            raise RobucapError(
                "the checkpoint being resumed has another tokenizer than the data module built; resume with robucap "
                "fit --ckpt_path (which uses the checkpoint's tokenizer) or pass data.tokenizer=<the run's tokenizer>"
            )
        device = next(self.captioner.parameters()).device if self.captioner is not None else torch.device("cpu")
        self.tokenizer = saved
        self.captioner = None
        self.configure_model()
        self.captioner.to(device)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_tokenizer"):
            datamodule.use_tokenizer(saved, "the checkpoint's tokenizer")
        log.info("using the checkpoint's tokenizer, which differs from the data module's")

    # -- inference ----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced mean cross-entropy.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1]; ``labels``: ``(B, T)``.
        """
        return self.captioner(pixel_values, labels).loss

    @torch.no_grad()
    def caption(self, pixel_values: torch.Tensor, num_beams: int | None = None) -> list[str]:
        """Generate captions (greedy unless ``num_beams`` > 1).

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1].
        """
        tokens = self.captioner.generate(
            pixel_values, max_new_tokens=self.hparams.max_new_tokens, num_beams=num_beams or self.hparams.num_beams
        )
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.captioner(batch["pixel_values"], batch["labels"]).loss
        size = batch["pixel_values"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        # Per-epoch mean too: a run with fewer batches than log_every_n_steps logs no step value at all.
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, batch_size=size)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            # Logged here rather than by LearningRateMonitor, which refuses to run without a logger.
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.captioner.named_parameters():
            if not param.requires_grad:
                continue  # frozen parts (FreezeEncoder / FreezeDecoder) never enter the optimizer
            is_plain_weight = param.ndim >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name
            (decay if is_plain_weight else no_decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        schedule = SCHEDULES[hp.schedule]
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ---------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_samples = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Loss, greedy captions and BLEU statistics of one batch.

        Returns:
            ``{"predictions": [...]}``: the generated captions, so callbacks (e.g. backdoor evaluation) can reuse them
            in ``on_validation_batch_end`` instead of generating again.
        """
        images = batch["pixel_values"]
        loss = self.captioner(images, batch["labels"]).loss
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        predictions = self.caption(images)
        self.val_bleu.update(predictions, batch["references"], batch["image_id"])
        room = self.hparams.num_samples - len(self.val_samples)
        for i in range(min(room, len(predictions))):
            self.val_samples.append(
                {
                    "image_id": batch["image_id"][i],
                    "image": images[i].detach().mul(255).round().to(torch.uint8).cpu(),
                    "prediction": predictions[i],
                    "references": batch["references"][i],
                }
            )
        return {"predictions": predictions}

    def on_validation_epoch_end(self) -> None:
        # CaptionBLEU syncs and de-duplicates image ids itself, so every rank holds the same exact values.
        scores = self.val_bleu.compute()
        self.val_bleu.reset()
        for key, value in scores.items():
            self.log(f"val/{key}", value.float(), prog_bar=key == "bleu4", sync_dist=True)

    # -- test ---------------------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_records = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        predictions = self.caption(batch["pixel_values"])
        files = batch.get("file", [None] * len(predictions))
        for image_id, file, prediction, refs in zip(
            batch["image_id"], files, predictions, batch["references"], strict=True
        ):
            self.test_records.append(
                {"image_id": image_id, "file": file, "prediction": prediction, "references": list(refs)}
            )

    # -- predict ------------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Caption a batch of images.

        Returns:
            One ``{"image_id", "file", "caption"}`` row per image (what ``predictions.jsonl`` holds).
        """
        captions = self.caption(batch["pixel_values"])
        return [
            {"image_id": image_id, "file": file, "caption": caption}
            for image_id, file, caption in zip(batch["image_id"], batch["file"], captions, strict=True)
        ]

    def on_test_epoch_end(self) -> None:
        records = gather_unique(self.test_records)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            scores = coco_caption_scores(
                {r["image_id"]: r["prediction"] for r in records}, {r["image_id"]: r["references"] for r in records}
            )
        self.test_results = {"scores": scores, "predictions": records}
        self.log_dict({f"test/{k}": float(v) for k, v in scores.items()}, sync_dist=True)


def read_checkpoint_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load only the tokenizer stored in a robucap checkpoint (no pickled code is executed)."""
    return read_checkpoint_info(path).tokenizer
