"""The segmenter victim: a semantic segmentation network trained with Lightning on masks rasterised from polygons.

Architectures (``arch``):

- ``small``: a tiny fully convolutional network (stride 8, dilated layers for context, a stride-2 skip for sharp
  edges, bilinear upsampling): trains on the shapes instances at 128 px on two CPU cores in minutes.
- torchvision's ``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``, ``deeplabv3_resnet101``,
  ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large`` with random initialisation, or ``weights``: a
  local state-dict file (the classifier's last layer is re-initialised when its number of classes differs). Nothing
  is ever downloaded.

Every architecture maps images in [0, 1] (normalised inside, with ImageNet statistics as torchvision's weights
expect) to per-pixel logits at the input size: :meth:`SegmentationModule.forward`, differentiable with respect to
the images, is what an attack such as DAG (Xie et al. 2017) calls. The loss is cross-entropy over the semantic masks
(crowd pixels ignored); ``val/miou`` and ``test/miou`` are torchmetrics' ``MulticlassJaccardIndex`` (macro: the mean
over classes present in the predictions or the masks, background included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_confusion_matrix

from datamodules.errors import DataError, RobucapError
from datamodules.instances import IGNORE_INDEX, InstanceBatch
from modules.dense import DenseVictimModule, load_local_weights
from modules.metrics import gather_unique

__all__ = [
    "SEGMENTER_ARCHITECTURES",
    "SegmentationModule",
    "SmallSegmenter",
    "build_segmenter",
    "class_iou",
    "mean_iou",
]

SEGMENTER_ARCHITECTURES = (
    "small",
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _conv(channels_in: int, channels_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class SmallSegmenter(nn.Module):
    """A tiny FCN: stride-8 encoder with dilated context layers, a stride-2 skip, bilinear upsampling.

    Returns ``{"out": logits}`` like torchvision's segmentation models.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 32, 2), _conv(32, 32))
        self.encoder = nn.Sequential(
            _conv(32, 64, 2), _conv(64, 64), _conv(64, 96, 2), _conv(96, 96, dilation=2), _conv(96, 96, dilation=4)
        )
        self.skip = nn.Conv2d(32, 32, 1)
        self.head = nn.Sequential(_conv(96 + 32, 64), nn.Conv2d(64, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits at the input size.

        Shape:
            ``x``: ``(B, 3, H, W)`` normalised; ``out``: ``(B, num_classes, H, W)``.
        """
        shallow = self.stem(x)
        deep = self.encoder(shallow)
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([deep, self.skip(shallow)], dim=1))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def build_segmenter(arch: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build a segmentation network returning ``{"out": logits}`` at the input size.

    Args:
        arch: One of :data:`SEGMENTER_ARCHITECTURES`.
        num_classes: Categories plus background.
        weights: A local state-dict file for the whole network, or ``None`` for random initialisation.

    Raises:
        RobucapError: An unknown ``arch``, or a weights file that is missing or does not fit.
    """
    if arch not in SEGMENTER_ARCHITECTURES:
        raise RobucapError(f"model.arch must be one of {', '.join(SEGMENTER_ARCHITECTURES)}, got {arch!r}")
    if arch == "small":
        model: nn.Module = SmallSegmenter(num_classes)
    else:
        builder = getattr(torchvision.models.segmentation, arch)
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if weights is not None:
        # torchvision's files carry an auxiliary head this network does not build; they are not "unexpected".
        heads = ("classifier.4", "classifier.low_classifier", "classifier.high_classifier")
        load_local_weights(
            model, weights, "model.init_args.weights", skip_mismatched=heads, ignore=("aux_classifier.",)
        )
    return model


def mean_iou(confusion: torch.Tensor) -> float:
    """torchmetrics' macro Jaccard index of a confusion matrix summed over images.

    Shape:
        ``confusion``: ``(C, C)``, rows the true class, columns the predicted one.
    """
    # Records are already gathered from every process, so the metric must not synchronise again.
    metric = MulticlassJaccardIndex(
        confusion.shape[0], average="macro", ignore_index=IGNORE_INDEX, sync_on_compute=False
    )
    # An empty update marks the metric as updated (no warning); the summed matrix is then its whole state.
    metric.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    metric.confmat += confusion.to(metric.confmat)
    return float(metric.compute())


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Each class's IoU ``tp / (tp + fp + fn)`` of a confusion matrix summed over images; NaN for a class absent
    from both the masks and the predictions (the classes :func:`mean_iou`'s macro average leaves out).

    Shape:
        ``confusion``: ``(C, C)``, rows the true class, columns the predicted one; returns ``(C,)`` float64.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1.0), torch.full_like(tp, float("nan")))


class SegmentationModule(DenseVictimModule):
    """Trains and evaluates a segmentation network on the semantic masks of
    :class:`~datamodules.instances.InstancesDataModule`.

    Args:
        arch: ``small`` or a torchvision segmentation builder (see :data:`SEGMENTER_ARCHITECTURES`).
        num_classes: Categories plus background (6 for the shapes data).
        image_size: Input side in pixels; the CLI links it to ``data.image_size``.
        weights: A local torchvision state-dict file to start from (``None``: random initialisation).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio`` × lr at the end of training) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for ``cosine``.
    """

    victim = "segmenter"

    def __init__(
        self,
        arch: str = "small",
        num_classes: int = 6,
        image_size: int = 128,
        weights: str | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.05,
    ) -> None:
        super().__init__()
        self.check_settings(lr, schedule, min_lr_ratio, warmup_steps, num_classes)
        self.save_hyperparameters()
        self.model = build_segmenter(arch, num_classes, weights)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.eval_records: list[dict[str, Any]] = []
        self.test_results: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        """Check the data's categories, and that its training split has polygons to learn from.

        Raises:
            DataError: The training instances carry no segmentation.
        """
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage != "fit" or not hasattr(datamodule, "load_split"):
            return
        split = datamodule.load_split("train")
        if not split.has_polygons:
            raise DataError(
                f"{split.source}: no annotation has a segmentation (polygons or RLE); a segmenter needs masks"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits (column 0 the background), differentiable with respect to ``images``.

        Shape:
            ``images``: ``(B, 3, H, W)`` in [0, 1]; result ``(B, num_classes, H, W)``.
        """
        return self.model((images - self.mean) / self.std)["out"]

    def training_step(self, batch: InstanceBatch, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch.images), batch.masks, ignore_index=IGNORE_INDEX)
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, batch_size=size)
        self.log_lr()
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: InstanceBatch, stage: str) -> None:
        logits = self(batch.images)
        loss = F.cross_entropy(logits, batch.masks, ignore_index=IGNORE_INDEX)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True)
        predictions = logits.argmax(dim=1)
        classes = self.hparams.num_classes
        for image_id, predicted, mask in zip(batch.image_ids, predictions, batch.masks, strict=True):
            # One small matrix per image, so images that DDP pads in twice count once (gather_unique).
            confusion = multiclass_confusion_matrix(predicted, mask, classes, ignore_index=IGNORE_INDEX)
            self.eval_records.append({"image_id": image_id, "confusion": confusion.cpu()})

    def _miou(self) -> float:
        gathered = gather_unique(self.eval_records)
        self.eval_records = []
        classes = self.hparams.num_classes
        total = torch.zeros(classes, classes, dtype=torch.long)
        for record in gathered:
            total += record["confusion"]
        return mean_iou(total)

    def on_validation_epoch_start(self) -> None:
        self.eval_records = []

    def validation_step(self, batch: InstanceBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log("val/miou", self._miou(), prog_bar=True, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.eval_records = []

    def test_step(self, batch: InstanceBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_results = {"miou": self._miou()}
        self.log("test/miou", self.test_results["miou"], sync_dist=False)

    def predict_step(self, batch: InstanceBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Predicted class maps per image: ``{"image_id", "mask"}`` (``(H, W)`` long tensors on the CPU)."""
        predictions = self(batch.images).argmax(dim=1).cpu()
        return [{"image_id": i, "mask": m} for i, m in zip(batch.image_ids, predictions, strict=True)]
