"""The LightningModule that trains and evaluates any :class:`~modules.captioners.Captioner`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerFast

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo, tokenizer_from_state, tokenizer_to_state
from modules.captioners import Captioner, CaptionerSettings, ViTGPT2Settings, resolve_captioner_settings
from modules.captioners.base import BEAM_LENGTH_PENALTY
from modules.checkpoint import TOKENIZER_KEY, read_checkpoint_info, same_tokenizer, upgrade_model_settings
from modules.metrics import CaptionBLEU, coco_caption_scores, gather_unique
from modules.schedules import SCHEDULES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezeRequest:
    """A part of the captioner to keep frozen (see :meth:`CaptioningModule.freeze_part`).

    Attributes:
        part: ``encoder`` or ``decoder``.
        train_bn: Leave the part's BatchNorm layers trainable (Lightning's ``BaseFinetuning`` convention).
        requested_by: Who asked (a callback's name), for error messages.
    """

    part: str
    train_bn: bool = False
    requested_by: str = "freeze_part"


class CaptioningModule(L.LightningModule):
    """Teacher-forced training, generation-based evaluation.

    The captioner is injected as settings (:mod:`modules.captioners.settings`) and built in :meth:`configure_model`,
    once the tokenizer is known (from the data module, or from the checkpoint being loaded, which carries its
    tokenizer as plain JSON). Nothing here depends on the architecture.

    Args:
        captioner: The captioner's settings object, e.g. ``ViTGPT2Settings(preset="tiny")``, or its
            ``{"class_path": ..., "init_args": {...}}`` form (what YAML files and checkpoints hold), or a short name
            such as ``show_attend_tell`` (default settings; also allowed as ``class_path``).
        image_size: Input side in pixels; the CLI links it to ``data.image_size``.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to the captioner's ``no_weight_decay()`` parameters: biases,
            norms and embeddings).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio`` × lr at the end of training) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for ``cosine``.
        max_new_tokens: Longest generated caption, EOS included.
        num_beams: 1 for greedy decoding, more for beam search.
        length_penalty: Beam search scores a finished caption ``sum_logprobs / length ** length_penalty``, as
            transformers does, for every captioner (0: summed log-probabilities).
        num_samples: Validation images kept each epoch (with captions) for logging.
    """

    def __init__(
        self,
        captioner: CaptionerSettings | Mapping[str, Any] | str = ViTGPT2Settings(),
        image_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.05,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        length_penalty: float = BEAM_LENGTH_PENALTY,
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
        self.captioner_settings = resolve_captioner_settings(captioner)
        self.save_hyperparameters()
        # Plain data, so checkpoints load with weights_only=True and YAML dumps read like the config files.
        self.hparams["captioner"] = self.captioner_settings.to_dict()
        self.captioner: Captioner | None = None
        self.frozen_parts: dict[str, FreezeRequest] = {}
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
        vocab = VocabInfo.from_tokenizer(self.tokenizer)
        self.captioner = self.captioner_settings.build(vocab, self.hparams.image_size)
        # Lightning calls this hook before wrapping the model in DDP and building the optimizer, so parts frozen
        # here are in neither.
        for request in self.frozen_parts.values():
            self._freeze(request)

    @property
    def architecture(self) -> str:
        """The captioner's short name (``vit_gpt2``), or its settings class path for an unnamed one."""
        return self.captioner_settings.name or self.hparams["captioner"]["class_path"]

    # -- freezing -----------------------------------------------------------------------------------------------
    def freeze_part(self, part: str, train_bn: bool = False, requested_by: str = "freeze_part") -> None:
        """Keep ``captioner.<part>`` frozen: now if the captioner exists, else as soon as :meth:`configure_model`
        builds it (and again whenever it is rebuilt). Callbacks such as ``FreezeEncoder`` call this from their
        ``setup``; frozen parameters get ``requires_grad=False`` and stay out of the optimizer.

        Args:
            part: ``encoder`` or ``decoder``.
            train_bn: Leave the part's BatchNorm layers trainable.
            requested_by: Named in error messages.

        Raises:
            RobucapError: The captioner has no such part with parameters.
        """
        request = FreezeRequest(part, train_bn, requested_by)
        self.frozen_parts[part] = request
        if self.captioner is not None:
            self._freeze(request)

    def _freeze(self, request: FreezeRequest) -> None:
        captioner = self.captioner
        prefix = f"{request.requested_by}: the captioner {type(captioner).__name__} has no {request.part}"
        try:
            module = getattr(captioner, request.part)
        except (AttributeError, NotImplementedError) as err:
            raise RobucapError(f"{prefix} to freeze ({err})") from err
        if not isinstance(module, nn.Module) or next(iter(module.parameters()), None) is None:
            raise RobucapError(f"{prefix} with parameters to freeze")
        BaseFinetuning.freeze(module, train_bn=request.train_bn)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TOKENIZER_KEY] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's tokenizer: its weights mean nothing with another vocabulary or word order.

        A checkpoint from before captioners were injected names its captioner with flat settings (``arch``,
        ``preset``...) that ``load_from_checkpoint`` drops; its captioner is taken here, before it is built.
        """
        if TOKENIZER_KEY not in checkpoint:
            raise RobucapError("this checkpoint was not written by robucap's CaptioningModule (no tokenizer inside)")
        self._adopt_legacy_captioner(checkpoint.get("hyper_parameters") or {})
        saved = tokenizer_from_state(checkpoint[TOKENIZER_KEY])
        if self.tokenizer is not None and not same_tokenizer(self.tokenizer, saved):
            self._adopt_tokenizer(saved)
        self.tokenizer = saved
        self.configure_model()

    def _adopt_legacy_captioner(self, hparams: Mapping[str, Any]) -> None:
        """Use the captioner that an older checkpoint's ``arch``/``preset``/... settings name.

        ``load_from_checkpoint`` built this module with the default captioner settings (it drops settings that are
        not ``__init__`` arguments) and has not built the captioner yet; a module that has one (the CLI builds it
        from :func:`~modules.checkpoint.read_checkpoint_info`, which translates the same way) must be of the same
        architecture.

        Raises:
            RobucapError: The settings name no captioner, or another architecture than the built one.
        """
        if "captioner" in hparams or ("arch" not in hparams and self.captioner is not None):
            return  # today's form (already this module's settings), or a module built by hand for bare weights
        upgraded = upgrade_model_settings(hparams, "this checkpoint")
        settings = resolve_captioner_settings(upgraded["captioner"])
        if self.captioner is None:
            self.captioner_settings = settings
            self.hparams["captioner"] = upgraded["captioner"]
        elif type(settings) is not type(self.captioner_settings):
            raise RobucapError(
                f"this checkpoint holds a {hparams['arch']} captioner, but the module was built as {self.architecture}"
            )

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
    def caption(
        self, pixel_values: torch.Tensor, num_beams: int | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Generate captions (greedy unless ``num_beams`` > 1); ``None`` options take the module's settings.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1].
        """
        tokens = self.captioner.generate(
            pixel_values,
            max_new_tokens=max_new_tokens or self.hparams.max_new_tokens,
            num_beams=num_beams or self.hparams.num_beams,
            length_penalty=self.hparams.length_penalty,
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
        exempt = self.captioner.no_weight_decay()
        for name, param in self.captioner.named_parameters():
            if not param.requires_grad:
                continue  # frozen parts (FreezeEncoder / FreezeDecoder) never enter the optimizer
            (no_decay if name in exempt else decay).append(param)
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
