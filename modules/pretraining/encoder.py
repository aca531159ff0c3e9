"""Encoder pretraining: a ``ViTModel`` of a captioner preset's encoder config learns what shapes images show.

Two heads on the final (layer-normed) token states, the states a captioner's cross-attention reads, trained
together; neither is exported, only the ``ViTModel``:

* image level: multi-label recognition over :data:`datamodules.pretraining.ATTRIBUTE_LABELS` (which shapes, colours,
  sizes and colour-shape pairs occur, and how many objects) from the mean of all tokens, a stand-in for the image
  classification ``google/vit-*`` checkpoints are trained on;
* patch level: every patch token classifies the shape, colour and size of the object whose box holds the patch's
  centre (or background), as dense (segmentation-style) pretraining does, so each token carries what is where: the
  cross-attention of a captioner reads tokens, not a pooled vector.

The encoder learns images, never captions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from datamodules.errors import RobucapError
from datamodules.pretraining import ATTRIBUTE_LABELS, REGION_CLASSES, AttributeBatch
from modules.captioners.base import ImageNormalize
from modules.captioners.vit_gpt2 import PRESETS, VIT_MEAN, VIT_STD
from modules.pretraining.base import PretrainingModule, check_optimiser_settings, check_preset

__all__ = ["EncoderPretraining"]


class EncoderPretraining(PretrainingModule):
    """Attribute recognition (image labels, patch regions) with a ViT-GPT2 preset's encoder; exports the ``ViTModel``.

    The loss is the image labels' binary cross-entropy plus the mean of the three patch cross-entropies. Logs
    ``train/loss``, ``val/loss`` (that sum), ``val/label_loss`` (binary cross-entropy per label),
    ``val/chance_loss`` (the same of always predicting each label's training frequency), ``val/f1`` (micro F1 at
    0.5), ``val/exact`` (share of images with every label right) and ``val/region_accuracy`` (share of object
    patches whose shape, colour and size are all right).

    Args:
        image_size: Input side in pixels (follows ``data.image_size``); the exported encoder expects it.
        preset: The captioner preset whose encoder config is used (``tiny`` or ``base``).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` or ``constant`` after the warm-up.
        min_lr_ratio: Final learning rate of the cosine schedule, as a fraction of ``lr``.
        export_dir: Where the trained ``ViTModel`` is saved when training ends (``None``:
            ``<trainer.default_root_dir>/pretrained``).
    """

    kind = "encoder_pretraining"

    def __init__(
        self,
        image_size: int = 64,
        preset: str = "tiny",
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optimiser_settings(lr, weight_decay, warmup_steps, schedule, min_lr_ratio)
        check_preset(preset)
        settings = PRESETS[preset]["encoder"]
        if image_size % settings["patch_size"]:
            raise RobucapError(
                f"data.image_size {image_size} is not a multiple of the {preset} encoder's patch size "
                f"{settings['patch_size']}"
            )
        # The captioner's config exactly (modules/captioners/vit_gpt2.py), so preset 'pretrained' builds the same net.
        self.encoder = ViTModel(ViTConfig(image_size=image_size, **settings))
        self.normalize = ImageNormalize(VIT_MEAN, VIT_STD)
        n_labels = len(ATTRIBUTE_LABELS)
        hidden = self.encoder.config.hidden_size
        self.head = nn.Linear(hidden, n_labels)
        self.region_head = nn.Linear(hidden, sum(REGION_CLASSES))
        # Chance level: the training frequency of each label, set from the data in setup().
        self.register_buffer("prior", torch.full((n_labels,), 0.5), persistent=False)
        self.val_loss = MeanMetric()
        self.val_label_loss = MeanMetric()
        self.val_chance = MeanMetric()
        self.val_region = MeanMetric()
        self.val_f1 = MultilabelF1Score(num_labels=n_labels, average="micro")
        self.val_exact = MultilabelExactMatch(num_labels=n_labels)

    def setup(self, stage: str) -> None:
        """Take the chance-level prior from the data and check that its labels are this head's.

        Raises:
            RobucapError: The data module labels other attributes.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "label_names", None)
        if names is not None and tuple(names) != ATTRIBUTE_LABELS:
            raise RobucapError(
                f"the data labels {len(names)} attributes but the encoder head predicts {len(ATTRIBUTE_LABELS)}: use "
                "datamodules.pretraining.ShapesAttributesDataModule"
            )
        if hasattr(datamodule, "label_prior"):
            self.prior = datamodule.label_prior().to(self.prior.device)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image label logits and patch region logits.

        Shape:
            ``(B, 3, S, S)`` images in [0, 1] in; ``(B, L)`` label logits and ``(B, N, C)`` region logits out, ``N``
            patches in row-major order, ``C = sum(REGION_CLASSES)`` (shape, colour and size classes concatenated).
        """
        states = self.encoder(pixel_values=self.normalize(pixel_values)).last_hidden_state
        return self.head(states.mean(1)), self.region_head(states[:, 1:])

    def _patch_targets(self, regions: torch.Tensor) -> torch.Tensor:
        """The region classes at each patch's centre pixel.

        Shape:
            ``(B, 3, S, S)`` in, ``(B, N, 3)`` out.
        """
        patch = int(self.encoder.config.patch_size)
        centres = regions[:, :, patch // 2 :: patch, patch // 2 :: patch]
        return centres.flatten(2).transpose(1, 2)

    def _losses(
        self, batch: AttributeBatch, label_logits: torch.Tensor, region_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: label loss, region loss, and whether each patch's three classes are right, with the object
        patches' mask.

        Shape:
            ``(B,)``, ``(B,)``, ``(B, N)``, ``(B, N)``.
        """
        label_loss = F.binary_cross_entropy_with_logits(label_logits, batch.labels, reduction="none").mean(1)
        targets = self._patch_targets(batch.regions)
        region_loss = torch.zeros_like(label_loss)
        right = torch.ones_like(targets[..., 0], dtype=torch.bool)
        for channel, logits in enumerate(region_logits.split(list(REGION_CLASSES), dim=-1)):
            target = targets[..., channel]
            region_loss = region_loss + F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1) / 3
            right &= logits.argmax(-1).eq(target)
        return label_loss, region_loss, right, targets[..., 0].gt(0)

    def training_step(self, batch: AttributeBatch, batch_idx: int) -> torch.Tensor:
        label_loss, region_loss, _, _ = self._losses(batch, *self(batch.pixel_values))
        loss = (label_loss + region_loss).mean()
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        self.log("train/epoch_loss", loss, batch_size=len(batch), on_step=False, on_epoch=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: AttributeBatch, batch_idx: int) -> None:
        label_logits, region_logits = self(batch.pixel_values)
        label_loss, region_loss, right, objects = self._losses(batch, label_logits, region_logits)
        labels = batch.labels
        prior = self.prior.clamp(1e-6, 1 - 1e-6).expand_as(labels)
        chance = F.binary_cross_entropy(prior, labels, reduction="none").mean(1)
        self.val_loss.update(label_loss + region_loss)
        self.val_label_loss.update(label_loss)
        self.val_chance.update(chance)
        self.val_region.update(right[objects].float())
        self.val_f1.update(label_logits.sigmoid(), labels.long())
        self.val_exact.update(label_logits.sigmoid(), labels.long())

    def on_validation_epoch_end(self) -> None:
        for name, metric in (
            ("val/loss", self.val_loss),
            ("val/label_loss", self.val_label_loss),
            ("val/chance_loss", self.val_chance),
            ("val/f1", self.val_f1),
            ("val/exact", self.val_exact),
            ("val/region_accuracy", self.val_region),
        ):
            self.log(name, metric.compute(), prog_bar=name == "val/f1")
            metric.reset()

    def save_pretrained(self, directory: Path) -> None:
        """The ``ViTModel`` (config + weights) and a ``ViTImageProcessor`` with the captioner's normalisation, the
        files of a ``google/vit-*`` directory."""
        self.encoder.save_pretrained(directory)
        size = int(self.encoder.config.image_size)
        processor = ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=list(VIT_MEAN), image_std=list(VIT_STD)
        )
        processor.save_pretrained(directory)
