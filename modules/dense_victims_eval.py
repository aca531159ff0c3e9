"""Dense Adversary Generation (Xie et al. 2017) on a detector or a segmenter, scored as the paper's Table 1.

:func:`attack_detector` and :func:`attack_segmenter` run DAG on every image with at least one ground-truth object
(the others are **skipped** and counted, not attacked and not scored), then evaluate the **whole** victim on

* the clean images: ``clean_map50`` / ``clean_map`` (detector, torchmetrics' COCO mAP@0.5 and mAP@[0.5:0.95]) or
  ``clean_miou`` (segmenter, macro IoU of the summed confusion matrices);
* what lies under those scores (not the paper's; they say why a score stays where it is): for the detector
  ``recall50`` (share of ground-truth objects that a detection of their class overlaps at IoU >= 0.5, at any kept
  score; mAP ranks detections, so such an object still counts once the false positives above it are passed) and
  ``top1_50`` (share whose highest-scoring detection at IoU >= 0.5 is of their class, the argmax DAG attacks); for the
  segmenter ``iou_background`` and ``miou_foreground`` (the mean IoU of the object classes): DAG keeps background
  pixels as they are, so ``miou`` cannot fall below about ``iou_background / C``;
* ``x + r``, DAG's adversarial images: ``adv_*``;
* the **permuted control** (the paper's Table 1): ``x + P(r)``, where ``P`` permutes the rows and the columns of
  each image's perturbation at random (one row and one column permutation per image and draw, the same for the
  three channels, seeded), clipped to [0, 1]; ``perm_*`` averages the scores of :data:`PERMUTATION_DRAWS` draws.
  Permuting keeps every value of ``r`` and destroys its spatial structure.

``iterations`` is the mean number of DAG steps over the attacked images; ``p`` is the paper's perceptibility
(section 3.5.3): per image ``p = sqrt(1/K sum_k ||r_k||^2)``, ``K = H * W`` pixels, ``r_k`` the RGB vector of the
perturbation at pixel ``k`` in [0, 1] units (i.e. ``||r||_2 / sqrt(H * W)``), averaged over the attacked images as
the paper averages it over its test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchvision.ops import box_iou

from datamodules.instances import IGNORE_INDEX, InstanceBatch
from modules.attacks.dag import DAG, perceptibility
from modules.attacks.protocol import AttackResult
from modules.detection import DetectionModule, mean_average_precision
from modules.segmentation import SegmentationModule, class_iou, mean_iou
from modules.victims.dense import DenseObjective
from modules.victims.detector import DetectorObjective
from modules.victims.segmenter import SegmenterObjective

__all__ = [
    "PERMUTATION_DRAWS",
    "DenseDagEvaluation",
    "DenseDagImage",
    "Scorer",
    "attack_detector",
    "attack_segmenter",
    "detection_truth",
    "object_recall",
    "detector_scorer",
    "permute_rows_columns",
    "segmenter_scorer",
]

Scorer = Callable[[torch.Tensor], tuple[dict[str, float], list[Any]]]
"""Scores a victim on a set of images (``(N, 3, H, W)`` in [0, 1], in the order of its ground truth): its metrics
(``map50`` and ``map``, or ``miou``) and its per-image outputs (detections, or predicted class maps)."""

PERMUTATION_DRAWS = 3
"""Random permutations of ``r`` averaged in the permuted control (the paper: "three times")."""


def permute_rows_columns(r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's perturbation with its rows and its columns randomly permuted (all channels alike).

    Args:
        r: Perturbations. Shape: ``(B, C, H, W)``.
        generator: A CPU generator; one row and one column permutation are drawn per image, in order.

    Shape:
        returns ``(B, C, H, W)``: ``out[b, :, i, j] = r[b, :, rows_b[i], cols_b[j]]``.
    """
    out = torch.empty_like(r)
    h, w = r.shape[-2:]
    for b in range(r.shape[0]):
        rows = torch.randperm(h, generator=generator).to(r.device)
        cols = torch.randperm(w, generator=generator).to(r.device)
        out[b] = r[b][:, rows][:, :, cols]
    return out


@dataclass(frozen=True)
class DenseDagImage:
    """One image of the split under DAG.

    Attributes:
        image_id: The dataset's id of the image.
        objects: Its ground-truth objects (0: skipped, not attacked and not scored).
        targets: DAG targets: proposals (detector) or foreground pixels (segmenter).
        fooled: Of them, no longer classified as their true class on the adversarial image.
        iterations: DAG steps taken.
        success: No target left classified as its true class.
        linf: ``||r||_inf`` in [0, 1] units.
        l2: ``||r||_2`` over all channels, [0, 1] units.
        p: Perceptibility ``l2 / sqrt(H * W)``.
    """

    image_id: Any
    objects: int
    targets: int
    fooled: int
    iterations: int
    success: bool
    linf: float
    l2: float
    p: float

    def to_json(self) -> dict[str, Any]:
        """The record as ``results.json`` stores it."""
        return asdict(self)


@dataclass
class DenseDagEvaluation:
    """DAG on a detector or a segmenter over a split (see the module docstring for each figure).

    Attributes:
        victim: ``detector`` or ``segmenter``.
        clean: Scores on the clean images (``map50`` and ``map``, or ``miou``).
        adversarial: The same on ``x + r``.
        permuted: The same on ``x + P(r)``, averaged over the draws.
        permuted_draws: The scores of each draw.
        iterations: Mean DAG steps per attacked image.
        p: Mean perceptibility, [0, 1] units.
        linf: Mean ``||r||_inf``, [0, 1] units.
        success: Share of attacked images with no target left classified as its true class.
        n: Images attacked and scored.
        skipped: Images without a ground-truth object.
        images: One record per image of the split, skipped ones included (``objects == 0``).
        clean_images: The attacked images, on the CPU. Shape: ``(n, 3, H, W)``.
        adversarial_images: Their adversarial versions, on the CPU. Shape: ``(n, 3, H, W)``.
        clean_outputs: Per attacked image, the victim's clean output (detections, or the predicted mask).
        adversarial_outputs: The same on the adversarial image.
    """

    victim: str
    clean: dict[str, float]
    adversarial: dict[str, float]
    permuted: dict[str, float]
    permuted_draws: list[dict[str, float]]
    iterations: float
    p: float
    linf: float
    success: float
    n: int
    skipped: int
    images: list[DenseDagImage] = field(repr=False)
    clean_images: torch.Tensor = field(repr=False)
    adversarial_images: torch.Tensor = field(repr=False)
    clean_outputs: list[Any] = field(repr=False)
    adversarial_outputs: list[Any] = field(repr=False)

    def scores(self) -> dict[str, Any]:
        """The figures, JSON-ready: ``clean_<metric>``, ``adv_<metric>``, ``perm_<metric>`` flat, no images."""
        flat: dict[str, Any] = {}
        for prefix, values in (("clean", self.clean), ("adv", self.adversarial), ("perm", self.permuted)):
            flat.update({f"{prefix}_{k}": v for k, v in values.items()})
        flat["perm_draws"] = self.permuted_draws
        flat.update(iterations=self.iterations, p=self.p, linf=self.linf, success=self.success, n=self.n)
        flat["skipped"] = self.skipped
        return flat


@dataclass
class _Attacked:
    """The attacked images of a split and DAG's per-image figures (internal)."""

    ids: list[Any] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)
    adversarial: list[torch.Tensor] = field(default_factory=list)
    truth: list[Any] = field(default_factory=list)
    figures: list[tuple[int, int, int, bool, float, float]] = field(default_factory=list)

    def add(self, batch: InstanceBatch, keep: list[int], objective: DenseObjective, result: AttackResult) -> None:
        with torch.no_grad():
            fooled = objective.fooled_counts(result.adversarial)
        self.ids += [batch.image_ids[i] for i in keep]
        self.objects += [_object_count(batch, i) for i in keep]
        self.clean.append(batch.images[keep].cpu())
        self.adversarial.append(result.adversarial.detach().cpu())
        for j, (t, f) in enumerate(zip(objective.target_counts().tolist(), fooled.tolist(), strict=True)):
            self.figures.append(
                (t, f, int(result.iterations[j]), bool(result.success[j]), float(result.linf[j]), float(result.l2[j]))
            )


def _object_count(batch: InstanceBatch, i: int) -> int:
    return len(batch.boxes[i]) + len(batch.crowd_boxes[i])


def _craft(
    batches: Sequence[InstanceBatch],
    attack: DAG,
    objective_of: Callable[[InstanceBatch, list[int], list[int]], DenseObjective],
    has_objects: Callable[[InstanceBatch, int], bool],
    seed: int,
    device: torch.device,
) -> tuple[_Attacked, list[tuple[Any, int]]]:
    """Run DAG on every image with ground truth; image ``k`` of the split is seeded with ``seed + k``."""
    attacked, skipped = _Attacked(), []
    offset = 0
    for batch in batches:
        keep = [i for i in range(len(batch)) if has_objects(batch, i)]
        skipped += [(batch.image_ids[i], offset + i) for i in range(len(batch)) if i not in keep]
        if keep:
            objective = objective_of(batch, keep, [seed + offset + i for i in keep])
            result = attack(objective, batch.images[keep].to(device))
            attacked.add(batch, keep, objective, result)
            attacked.truth += [(batch, i) for i in keep]
        offset += len(batch)
    return attacked, skipped


def _records(attacked: _Attacked, skipped: list[tuple[Any, int]], pixels: int) -> list[DenseDagImage]:
    """Per-image records in split order, skipped images included."""
    l2 = torch.tensor([f[5] for f in attacked.figures], dtype=torch.float64)
    p = perceptibility(l2, pixels).tolist() if len(l2) else []
    ordered = [
        DenseDagImage(image_id, attacked.objects[k], *figures, p[k])
        for k, (image_id, figures) in enumerate(zip(attacked.ids, attacked.figures, strict=True))
    ]
    # Skipped images go back to their place in the split (positions ascending, so earlier ones are in place).
    for image_id, position in skipped:
        ordered.insert(min(position, len(ordered)), DenseDagImage(image_id, 0, 0, 0, 0, False, 0.0, 0.0, 0.0))
    return ordered


def _evaluate(
    attacked: _Attacked,
    skipped: list[tuple[Any, int]],
    victim: str,
    score: Callable[[torch.Tensor], tuple[dict[str, float], list[Any]]],
    seed: int,
) -> DenseDagEvaluation:
    """Score the clean, adversarial and permuted images and gather the figures."""
    clean, adversarial = torch.cat(attacked.clean), torch.cat(attacked.adversarial)
    r = adversarial - clean
    clean_scores, clean_outputs = score(clean)
    adv_scores, adv_outputs = score(adversarial)
    generator = torch.Generator().manual_seed(int(seed))
    draws = [score((clean + permute_rows_columns(r, generator)).clamp(0.0, 1.0))[0] for _ in range(PERMUTATION_DRAWS)]
    permuted = {k: sum(d[k] for d in draws) / len(draws) for k in clean_scores}
    records = _records(attacked, skipped, clean.shape[-2] * clean.shape[-1])
    done = [rec for rec in records if rec.objects > 0]
    return DenseDagEvaluation(
        victim=victim,
        clean=clean_scores,
        adversarial=adv_scores,
        permuted=permuted,
        permuted_draws=draws,
        iterations=sum(rec.iterations for rec in done) / len(done),
        p=sum(rec.p for rec in done) / len(done),
        linf=sum(rec.linf for rec in done) / len(done),
        success=sum(rec.success for rec in done) / len(done),
        n=len(done),
        skipped=len(skipped),
        images=records,
        clean_images=clean,
        adversarial_images=adversarial,
        clean_outputs=clean_outputs,
        adversarial_outputs=adv_outputs,
    )


def attack_detector(
    module: DetectionModule,
    batches: Sequence[InstanceBatch],
    attack: DAG,
    seed: int = 0,
    batch_size: int = 16,
    shrink_only: bool = False,
    reselect_every: int = 0,
    margin: float = 0.0,
) -> DenseDagEvaluation | None:
    """DAG on a Faster R-CNN (the paper's dense proposals), then mAP of the whole detector clean / on ``x + r`` /
    on the permuted control.

    Args:
        module: The detector, in eval mode, on its device.
        batches: The split's images and ground truth, in order.
        attack: DAG (its ``gamma`` and ``max_iterations``).
        seed: Image ``k`` of the split draws its class permutation with seed ``seed + k``; the permuted control's
            generator is seeded with ``seed``.
        batch_size: Images evaluated at once.
        shrink_only: Targets that left the active set never come back (default: the paper's Algorithm 1).
        reselect_every: Select each image's dense proposals again on the current iterate every this many steps
            (0: the paper's fixed proposals of the clean image).
        margin: Keep a target active until its true class is this far below the best other class (0: the paper).

    Returns:
        The evaluation, or ``None`` when no image has a ground-truth object.
    """
    device = next(module.parameters()).device

    def objective_of(batch: InstanceBatch, keep: list[int], seeds: list[int]) -> DenseObjective:
        return DetectorObjective(
            module.model, batch.images[keep].to(device), [batch.boxes[i].to(device) for i in keep],
            [batch.labels[i].to(device) for i in keep], seeds=seeds, shrink_only=shrink_only,
            reselect_every=reselect_every, margin=margin,
        )  # fmt: skip

    # An image with only crowd objects has no target and no mAP ground truth to lose: it is skipped too.
    attacked, skipped = _craft(batches, attack, objective_of, lambda b, i: len(b.boxes[i]) > 0, seed, device)
    if not attacked.ids:
        return None
    score = detector_scorer(module, [detection_truth(batch, i) for batch, i in attacked.truth], batch_size)
    return _evaluate(attacked, skipped, "detector", score, seed)


def detector_scorer(module: DetectionModule, truth: Sequence[dict[str, torch.Tensor]], batch_size: int = 16) -> Scorer:
    """The whole detector re-run on images, scored with COCO mAP@0.5 and mAP against ``truth`` (one per image), with
    :func:`object_recall` beside them.

    Args:
        module: The detector, in eval mode, on its device.
        truth: Per image, the mAP ground truth (:func:`detection_truth`).
        batch_size: Images detected at once.
    """
    device = next(module.parameters()).device

    def score(images: torch.Tensor) -> tuple[dict[str, float], list[Any]]:
        found: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                chunk = module.detect(images[start : start + batch_size].to(device))
                found += [{k: v.detach().cpu() for k, v in f.items()} for f in chunk]
        records = [{"pred": f, "target": t} for f, t in zip(found, truth, strict=True)]
        return {**mean_average_precision(records), **object_recall(found, truth)}, found

    return score


def object_recall(
    found: Sequence[dict[str, torch.Tensor]], truth: Sequence[dict[str, torch.Tensor]], iou: float = 0.5
) -> dict[str, float]:
    """How many ground-truth objects the detections still find, and how many they find first (crowd boxes left out).

    Args:
        found: Per image, the detector's output (``boxes`` xyxy, ``scores``, ``labels``).
        truth: Per image, the ground truth (:func:`detection_truth`).
        iou: Overlap a detection needs with an object's box.

    Returns:
        ``recall50``: share of objects overlapped by a detection of their class (any kept score); ``top1_50``: share
        whose highest-scoring overlapping detection is of their class. Both -1 without objects.
    """
    objects = recalled = first = 0
    for f, t in zip(found, truth, strict=True):
        boxes = t["boxes"][t["iscrowd"].eq(0)]
        labels = t["labels"][t["iscrowd"].eq(0)]
        objects += len(boxes)
        if not len(boxes) or not len(f["boxes"]):
            continue
        overlap = box_iou(boxes.float(), f["boxes"].float()).ge(iou)  # (objects, detections)
        same = overlap & f["labels"].unsqueeze(0).eq(labels.unsqueeze(1))
        recalled += int(same.any(1).sum())
        # The best detection over each object's box, whatever its class: is it of the object's class?
        best = f["scores"].unsqueeze(0).expand_as(overlap).masked_fill(~overlap, -1.0).argmax(1)
        first += int((overlap.any(1) & f["labels"][best].eq(labels)).sum())
    if not objects:
        return {"recall50": -1.0, "top1_50": -1.0}
    return {"recall50": recalled / objects, "top1_50": first / objects}


def detection_truth(batch: InstanceBatch, i: int) -> dict[str, torch.Tensor]:
    """The mAP ground truth of one image, crowd boxes marked as such (as the detector's own evaluation does)."""
    crowd = torch.cat([torch.zeros(len(batch.boxes[i])), torch.ones(len(batch.crowd_boxes[i]))]).long()
    return {
        "boxes": torch.cat([batch.boxes[i], batch.crowd_boxes[i]]).cpu(),
        "labels": torch.cat([batch.labels[i], batch.crowd_labels[i]]).cpu(),
        "iscrowd": crowd,
    }


def attack_segmenter(
    module: SegmentationModule,
    batches: Sequence[InstanceBatch],
    attack: DAG,
    seed: int = 0,
    batch_size: int = 16,
    shrink_only: bool = False,
    margin: float = 0.0,
) -> DenseDagEvaluation | None:
    """DAG on every foreground pixel of a segmenter, then its mIoU clean / on ``x + r`` / on the permuted control.

    Args:
        module: The segmenter (its forward normalises [0, 1] images), in eval mode, on its device.
        batches: The split's images and semantic masks, in order.
        attack: DAG (its ``gamma`` and ``max_iterations``).
        seed: As for :func:`attack_detector`.
        batch_size: Images evaluated at once.
        shrink_only: Targets that left the active set never come back (default: the paper's Algorithm 1).
        margin: Keep a pixel active until its true class is this far below the best other class (0: the paper).

    Returns:
        The evaluation, or ``None`` when no image has a foreground pixel.
    """
    device = next(module.parameters()).device

    def objective_of(batch: InstanceBatch, keep: list[int], seeds: list[int]) -> DenseObjective:
        return SegmenterObjective(
            module, batch.images[keep].to(device), batch.masks[keep].to(device), seeds=seeds, shrink_only=shrink_only,
            margin=margin,
        )  # fmt: skip

    def has_objects(batch: InstanceBatch, i: int) -> bool:
        mask = batch.masks[i]
        return bool((mask.ne(0) & mask.ne(IGNORE_INDEX)).any())

    attacked, skipped = _craft(batches, attack, objective_of, has_objects, seed, device)
    if not attacked.ids:
        return None
    score = segmenter_scorer(module, torch.cat([batch.masks[i : i + 1] for batch, i in attacked.truth]), batch_size)
    return _evaluate(attacked, skipped, "segmenter", score, seed)


def segmenter_scorer(module: SegmentationModule, masks: torch.Tensor, batch_size: int = 16) -> Scorer:
    """The segmenter on images, scored with mIoU (macro over its classes, background included) against ``masks``,
    with the background's IoU and the object classes' mean IoU beside it.

    Args:
        module: The segmenter (its forward normalises [0, 1] images), in eval mode, on its device.
        masks: Ground-truth class maps, one per image. Shape: ``(N, H, W)``.
        batch_size: Images segmented at once.
    """
    device = next(module.parameters()).device
    classes = int(module.hparams.num_classes)

    def score(images: torch.Tensor) -> tuple[dict[str, float], list[Any]]:
        predicted = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                predicted.append(module(images[start : start + batch_size].to(device)).argmax(1).cpu())
        prediction = torch.cat(predicted)
        confusion = multiclass_confusion_matrix(prediction, masks, classes, ignore_index=IGNORE_INDEX)
        per_class = class_iou(confusion)
        foreground = per_class[1:][~per_class[1:].isnan()]
        figures = {
            "miou": mean_iou(confusion),
            "iou_background": float(per_class[0]),
            "miou_foreground": float(foreground.mean()) if len(foreground) else -1.0,
        }
        return figures, list(prediction)

    return score
