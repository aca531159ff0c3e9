"""The detector victim: a torchvision Faster R-CNN (two stages, so region proposals exist) trained with Lightning.

Architectures (``arch``):

- ``small``: a six-layer CNN (stride 8, 128 channels), anchors of 16-64 px and a 256-wide box head: trains on the
  shapes instances at 128 px on two CPU cores in minutes.
- ``fasterrcnn_mobilenet_v3_large_320_fpn`` and ``fasterrcnn_resnet50_fpn``: torchvision's builders with random
  initialisation, or ``weights``: a local state-dict file (torchvision's COCO weights fine-tune: the class-specific
  box predictor is re-initialised when their number of classes differs). Nothing is ever downloaded.

Inputs are images in [0, 1] of ``image_size`` × ``image_size``; ``min_size = max_size = image_size``, so torchvision's
transform normalises but does not resize them, and boxes and proposals are in input pixels.

What an attack such as DAG (Xie et al. 2017) calls, all differentiable with respect to ``images`` where stated:

- :meth:`DetectionModule.proposals` (no gradient): the RPN's proposals per image with a chosen NMS threshold and
  count (DAG's dense proposals: 0.9 and 3000).
- :meth:`DetectionModule.proposal_logits`: the RoI head's class logits on a fixed proposal set (differentiable).
- :meth:`DetectionModule.detect`: the whole detector (eval-mode detections), for evaluation on ``x + r``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from datamodules.errors import DataError, RobucapError
from datamodules.instances import InstanceBatch
from datamodules.poisoning.regions import CheckpointDetector, register_checkpoint_detector
from modules.dense import DenseVictimModule, load_local_weights, read_victim
from modules.metrics import gather_unique

__all__ = ["DETECTOR_ARCHITECTURES", "DetectionModule", "build_detector", "mean_average_precision", "region_detector"]

DETECTOR_ARCHITECTURES = ("small", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn")


def _conv(channels_in: int, channels_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


def small_backbone() -> nn.Sequential:
    """Six 3×3 conv layers to stride 8 (the last dilated, for a receptive field over the largest shapes)."""
    backbone = nn.Sequential(
        _conv(3, 32, 2), _conv(32, 32), _conv(32, 64, 2), _conv(64, 64), _conv(64, 128, 2), _conv(128, 128, dilation=2)
    )
    backbone.out_channels = 128
    return backbone


def build_detector(arch: str, num_classes: int, image_size: int, weights: str | None = None) -> FasterRCNN:
    """Build a Faster R-CNN that takes ``image_size`` px images in [0, 1] unchanged in size.

    Args:
        arch: One of :data:`DETECTOR_ARCHITECTURES`.
        num_classes: Categories plus background.
        image_size: Input side in pixels.
        weights: A local state-dict file for the whole detector, or ``None`` for random initialisation.

    Raises:
        RobucapError: An unknown ``arch``, or a weights file that is missing or does not fit.
    """
    if arch not in DETECTOR_ARCHITECTURES:
        raise RobucapError(f"model.arch must be one of {', '.join(DETECTOR_ARCHITECTURES)}, got {arch!r}")
    size = {"min_size": image_size, "max_size": image_size}
    if arch == "small":
        model = FasterRCNN(
            small_backbone(),
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(128 * 7 * 7, 256),
            box_predictor=FastRCNNPredictor(256, num_classes),
            # Few objects per image: fewer proposals and samples than torchvision's defaults, trained much faster.
            rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_test=100,
            rpn_batch_size_per_image=128,
            box_batch_size_per_image=32,
            **size,
        )
    else:
        builder = getattr(torchvision.models.detection, arch)
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **size)
    if weights is not None:
        load_local_weights(model, weights, "model.init_args.weights", skip_mismatched=("roi_heads.box_predictor",))
    return model


def mean_average_precision(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO mAP (IoU 0.5:0.95) and mAP@0.5 of per-image detections, with torchmetrics (pycocotools backend).

    Args:
        records: One per image: ``pred`` (``boxes`` xyxy, ``scores``, ``labels``) and ``target`` (``boxes``,
            ``labels``, ``iscrowd``) tensors.

    Returns:
        ``{"map": ..., "map50": ...}``; -1 where no ground truth exists (torchmetrics' convention).
    """
    # Records are already gathered from every process, so the metric must not synchronise again.
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
    metric.update([r["pred"] for r in records], [r["target"] for r in records])
    scores = metric.compute()
    return {"map": float(scores["map"]), "map50": float(scores["map_50"])}


class DetectionModule(DenseVictimModule):
    """Trains and evaluates a Faster R-CNN on COCO instances (:class:`~datamodules.instances.InstancesDataModule`).

    Args:
        arch: ``small``, ``fasterrcnn_mobilenet_v3_large_320_fpn`` or ``fasterrcnn_resnet50_fpn``.
        num_classes: Categories plus background (6 for the shapes data).
        image_size: Input side in pixels; the CLI links it to ``data.image_size``.
        weights: A local torchvision state-dict file to start from (``None``: random initialisation).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio`` × lr at the end of training) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for ``cosine``.
    """

    victim = "detector"

    def __init__(
        self,
        arch: str = "small",
        num_classes: int = 6,
        image_size: int = 128,
        weights: str | None = None,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.05,
    ) -> None:
        super().__init__()
        self.check_settings(lr, schedule, min_lr_ratio, warmup_steps, num_classes)
        self.save_hyperparameters()
        self.model = build_detector(arch, num_classes, image_size, weights)
        self.eval_records: list[dict[str, Any]] = []
        self.test_results: dict[str, float] = {}

    # -- what attacks call ----------------------------------------------------------------------------------------
    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The whole detector in eval mode: ``boxes`` (xyxy), ``scores``, ``labels`` per image (train mode restored).

        Shape:
            ``images``: ``(B, 3, S, S)`` in [0, 1].
        """
        with _eval_mode(self.model):
            return self.model(list(images))

    def features(self, images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        """Torchvision's transformed images (an ``ImageList``) and the backbone's feature maps (differentiable).

        Shape:
            ``images``: ``(B, 3, S, S)`` in [0, 1].
        """
        image_list, _ = self.model.transform(list(images))
        features = self.model.backbone(image_list.tensors)
        # A single-map backbone (the small preset) returns a tensor; torchvision names it "0" as FasterRCNN does.
        return image_list, {"0": features} if isinstance(features, torch.Tensor) else features

    @torch.no_grad()
    def proposals(
        self, images: torch.Tensor, nms_threshold: float = 0.7, max_proposals: int = 1000
    ) -> list[torch.Tensor]:
        """The RPN's proposals (eval mode), with the NMS threshold and count given here.

        Args:
            images: Images in [0, 1].
            nms_threshold: RPN NMS IoU threshold (DAG: 0.9, for dense proposals).
            max_proposals: Proposals kept per image before and after NMS (DAG: 3000).

        Returns:
            Per image, boxes ``x0, y0, x1, y1`` in input pixels.

        Shape:
            ``images``: ``(B, 3, S, S)``; each result ``(P_i, 4)``.
        """
        rpn = self.model.rpn
        saved = (rpn.nms_thresh, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n))
        rpn.nms_thresh = nms_threshold
        rpn._pre_nms_top_n = {"training": max_proposals, "testing": max_proposals}
        rpn._post_nms_top_n = {"training": max_proposals, "testing": max_proposals}
        try:
            with _eval_mode(self.model):
                image_list, features = self.features(images)
                boxes, _ = rpn(image_list, features)
        finally:
            rpn.nms_thresh, rpn._pre_nms_top_n, rpn._post_nms_top_n = saved
        return boxes

    def proposal_logits(self, images: torch.Tensor, proposals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI head's class logits on fixed proposals, differentiable with respect to ``images``.

        Runs in whatever mode the module is in (attacks put it in eval mode, so BatchNorm uses its statistics).

        Args:
            images: Images in [0, 1].
            proposals: Per image, boxes ``x0, y0, x1, y1`` in input pixels (e.g. from :meth:`proposals`).

        Returns:
            Per image, logits over ``num_classes`` (column 0 is the background).

        Shape:
            ``images``: ``(B, 3, S, S)``; ``proposals[i]``: ``(P_i, 4)``; each result ``(P_i, num_classes)``.
        """
        image_list, features = self.features(images)
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(features, list(proposals), image_list.image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        return list(logits.split([len(p) for p in proposals]))

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: InstanceBatch, batch_idx: int) -> torch.Tensor:
        losses = self.model(list(batch.images), batch.targets())
        loss = sum(losses.values())
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        self.log_lr()
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: InstanceBatch) -> None:
        detections = self.model(list(batch.images))
        for i, found in enumerate(detections):
            boxes = torch.cat([batch.boxes[i], batch.crowd_boxes[i]])
            labels = torch.cat([batch.labels[i], batch.crowd_labels[i]])
            crowd = torch.cat([torch.zeros(len(batch.boxes[i])), torch.ones(len(batch.crowd_boxes[i]))]).long()
            self.eval_records.append(
                {
                    "image_id": batch.image_ids[i],
                    "pred": {k: v.detach().cpu() for k, v in found.items()},
                    "target": {"boxes": boxes.cpu(), "labels": labels.cpu(), "iscrowd": crowd},
                }
            )

    def _scores(self) -> dict[str, float]:
        # De-duplicated by image id: DDP pads the last batches with repeated images, which must not count twice.
        records = gather_unique(self.eval_records)
        self.eval_records = []
        return mean_average_precision(records)

    def on_validation_epoch_start(self) -> None:
        self.eval_records = []

    def validation_step(self, batch: InstanceBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        scores = self._scores()
        self.log("val/map", scores["map"], sync_dist=False)
        self.log("val/map50", scores["map50"], prog_bar=True, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.eval_records = []

    def test_step(self, batch: InstanceBatch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._scores()
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items()}, sync_dist=False)

    def predict_step(self, batch: InstanceBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Detections per image: ``{"image_id", "boxes", "scores", "labels"}`` (tensors on the CPU)."""
        found = self.model(list(batch.images))
        return [
            {"image_id": image_id, **{k: v.cpu() for k, v in f.items()}}
            for image_id, f in zip(batch.image_ids, found, strict=True)
        ]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every submodule's own flag restored afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def region_detector(path: Path, score_threshold: float, device: torch.device) -> CheckpointDetector:
    """A detector checkpoint as the object-oriented backdoor's region source (``poison.detector.checkpoint``).

    Registered with :func:`datamodules.poisoning.regions.register_checkpoint_detector` when this module is imported
    (the data layer may not import it).

    Raises:
        DataError: The file holds a segmenter, a captioner or anything else than a detector.
    """
    info = read_victim(path)
    if info is None or info.victim != DetectionModule.victim:
        held = f"a {info.victim}" if info is not None else "no detector (a captioner's?)"
        raise DataError(
            f"poison.detector.checkpoint {path} holds {held} checkpoint; expected a detector checkpoint written by "
            "robucap fit --config configs/experiment/shapes_detector.yaml"
        )
    # weights=None: the file the detector was initialised from is not needed (and may be gone) once it is trained.
    module = DetectionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, weights=None)
    module = module.to(device).eval()
    heads = module.model.roi_heads
    # The RoI head drops detections under its own cut (0.05); a lower threshold must see them.
    heads.score_thresh = min(heads.score_thresh, score_threshold)
    hparams = module.hparams

    @torch.no_grad()
    def detect(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return module.detect(images.to(device))

    return CheckpointDetector(detect, int(hparams.image_size), f"{hparams.arch}, {hparams.num_classes} classes")


register_checkpoint_detector(region_detector)
