"""A two-stage detector as a dense victim: DAG's targets are dense proposals (Xie et al. 2017, section 3.2).

For a torchvision :class:`~torchvision.models.detection.FasterRCNN`:

* **Dense proposals**, once, on the clean image: the RPN with its NMS threshold raised to 0.9 and up to 3000
  proposals kept (the paper: "when the IOU goes up from 0.70 to 0.90, the average number of proposals on each image
  increases from around 300 to around 3000"). The target set ``T`` is then fixed: the paper optimises the
  misclassification of the original proposals and evaluates by re-running the whole detector on ``X + r``.
* **Targets**: the proposals with IoU > 0.1 to a ground-truth box **and** a softmax score > 0.1 for that box's
  class (the RoI head's, on the clean image); where several boxes qualify, the one of largest IoU gives the label.
* ``f(X, t_n)``: the RoI head's class logits (background at index 0) on those fixed proposals, differentiable with
  respect to the image through the model's own transform (normalisation, resize, padding), backbone, RoI pooling,
  box head and predictor. Proposals live in the transform's (resized) coordinates, where the RoI pooling wants
  them; ground-truth boxes are given in the input image's pixels and scaled to match.

**Re-selection (beyond the paper, off by default).** With ``reselect_every = k``, every ``k``-th refresh of an image
re-runs the dense RPN on the current iterate and selects its targets again with the same rule (IoU > 0.1 to a
ground-truth box, score > 0.1 for its class, on the iterate), keeping the image's permutation ``pi``. The paper fixes
the clean image's proposals and relies on their density for the error to reach the proposals the detector makes on
``X + r`` (section 3.2); a small detector with a coarse anchor grid has few such proposals, and re-selection attacks
the boxes the detector would now propose. Within an iteration the proposals stay fixed either way.

An image without ground-truth objects (or without a qualifying proposal) has no target: the objective reports it
done from the start, and :meth:`DetectorObjective.target_counts` is 0 for it (skipped and counted, not an error).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from datamodules.errors import RobucapError
from modules.attacks.protocol import eval_mode
from modules.victims.dense import DenseObjective, adversarial_permutation, image_seeds, rows_list


@dataclass(frozen=True)
class ProposalSettings:
    """How dense the proposals are and which become targets (the paper's values by default).

    Attributes:
        nms_threshold: The RPN's NMS IoU threshold (the paper raises 0.7 to 0.9).
        max_proposals: Proposals kept per image after NMS.
        pre_nms_top_n: Proposals per feature level entering NMS (enough for ``max_proposals`` to survive it).
        iou_threshold: A target's IoU with its ground-truth box must exceed this.
        score_threshold: A target's clean softmax score for that box's class must exceed this.
    """

    nms_threshold: float = 0.9
    max_proposals: int = 3000
    pre_nms_top_n: int = 6000
    iou_threshold: float = 0.1
    score_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("nms_threshold", "iou_threshold", "score_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RobucapError(f"detector DAG {name} must be in [0, 1], got {value!r}")
        for name in ("max_proposals", "pre_nms_top_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RobucapError(f"detector DAG {name} must be an integer >= 1, got {value!r}")


@contextmanager
def dense_rpn(rpn: RegionProposalNetwork, settings: ProposalSettings) -> Iterator[None]:
    """Temporarily make the RPN dense (NMS threshold, proposal counts), restoring its own settings afterwards."""
    saved = (rpn.nms_thresh, rpn._pre_nms_top_n, rpn._post_nms_top_n)
    rpn.nms_thresh = settings.nms_threshold
    rpn._pre_nms_top_n = {"training": settings.pre_nms_top_n, "testing": settings.pre_nms_top_n}
    rpn._post_nms_top_n = {"training": settings.max_proposals, "testing": settings.max_proposals}
    try:
        yield
    finally:
        rpn.nms_thresh, rpn._pre_nms_top_n, rpn._post_nms_top_n = saved


def _check_boxes(
    boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], count: int, classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate the ground truth: one ``(G, 4)`` xyxy box tensor and one ``(G,)`` label tensor per image."""
    if len(boxes) != count or len(labels) != count:
        raise RobucapError(
            f"expected ground-truth boxes and labels for each of {count} images, got {len(boxes)} "
            f"box sets and {len(labels)} label sets"
        )
    out = []
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        b, lab = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), torch.as_tensor(lab).long().reshape(-1)
        if b.shape[0] != lab.shape[0]:
            raise RobucapError(f"image {i}: {b.shape[0]} ground-truth boxes but {lab.shape[0]} labels")
        if lab.numel() and (lab.min() < 1 or lab.max() >= classes):
            raise RobucapError(
                f"image {i}: ground-truth labels must be classes 1..{classes - 1} of the detector (0 is background), "
                f"got {sorted(set(lab.tolist()))}"
            )
        out.append((b, lab))
    return out


class DetectorObjective(DenseObjective):
    """DAG's objective on a Faster R-CNN: fixed dense proposals near the ground truth, each pushed to ``pi(class)``.

    Args:
        model: A torchvision ``FasterRCNN`` (not a Lightning wrapper).
        pixel_values: The clean images in [0, 1]. Shape: ``(B, 3, H, W)``.
        boxes: Per image, the ground-truth boxes ``(x1, y1, x2, y2)`` in the pixels of ``pixel_values``.
            Shape: ``(G_i, 4)`` each.
        labels: Per image, the boxes' classes (1..C-1; 0 is the background). Shape: ``(G_i,)`` each.
        seeds: Seeds of the per-image class permutations (:func:`~modules.victims.dense.image_seeds`).
        proposals: Proposal density and target selection (:class:`ProposalSettings`; the paper's by default).
        shrink_only: A proposal that left the active set never comes back (default: the paper's recomputed set).
        reselect_every: Re-select each image's dense proposals on the current iterate every this many refreshes
            (0: never, the paper's fixed clean proposals; see the module docstring).
        margin: Keep a target active until its true class is this far below the best other class (0: the paper's
            rule; :class:`~modules.victims.dense.DenseObjective`).

    Attributes:
        proposals: Per image, the target proposals in the transform's coordinates (fixed for the whole attack
            unless ``reselect_every``). Shape: ``(N_i, 4)`` each.
        reselections: Per image, how many times its targets were selected again. Shape: ``(B,)``.
        proposal_counts: Dense proposals the RPN gave per image (before target selection). Shape: ``(B,)``.
        object_counts: Ground-truth objects per image. Shape: ``(B,)``.

    Raises:
        RobucapError: A model that is no ``FasterRCNN``, images not ``(B, 3, H, W)``, ground truth that does not
            match the images or the detector's classes.
    """

    def __init__(
        self,
        model: FasterRCNN,
        pixel_values: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        seeds: int | Sequence[int] = 0,
        proposals: ProposalSettings | None = None,
        shrink_only: bool = False,
        reselect_every: int = 0,
        margin: float = 0.0,
    ) -> None:
        if isinstance(reselect_every, bool) or not isinstance(reselect_every, int) or reselect_every < 0:
            raise RobucapError(f"detector DAG reselect_every must be an integer >= 0, got {reselect_every!r}")
        if not isinstance(model, FasterRCNN):
            hint = " (pass the torchvision model inside the Lightning module)" if hasattr(model, "model") else ""
            raise RobucapError(f"a detector objective needs a torchvision FasterRCNN, got {type(model).__name__}{hint}")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise RobucapError(f"detector images must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        self.model = model
        self.settings = proposals or ProposalSettings()
        self.num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
        truth = _check_boxes(boxes, labels, pixel_values.shape[0], self.num_classes)
        device = pixel_values.device
        dense, scores, sizes = self._dense_proposals(pixel_values)
        self.image_sizes = sizes
        self.proposal_counts = torch.tensor([len(p) for p in dense], dtype=torch.long)
        self.object_counts = torch.tensor([len(lab) for _, lab in truth], dtype=torch.long)
        self.reselect_every = reselect_every
        self.reselections = torch.zeros(pixel_values.shape[0], dtype=torch.long)
        self._refreshes = [0] * pixel_values.shape[0]
        self.proposals: list[torch.Tensor] = []
        self._truth: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pis: list[torch.Tensor] = []
        true, adversarial = [], []
        original = pixel_values.shape[-2:]
        for i, seed in enumerate(image_seeds(seeds, pixel_values.shape[0])):
            gt_boxes, gt_labels = truth[i][0].to(device), truth[i][1].to(device)
            scale = torch.tensor([sizes[i][1] / original[1], sizes[i][0] / original[0]] * 2, device=device)
            self._truth.append((gt_boxes * scale, gt_labels))
            self._pis.append(adversarial_permutation(self.num_classes, seed, background=0).to(device))
            keep, assigned = self._select(dense[i], scores[i], *self._truth[i])
            self.proposals.append(dense[i][keep])
            true.append(assigned)
            adversarial.append(self._pis[i][assigned])
        super().__init__(model, true, adversarial, shrink_only=shrink_only, margin=margin)

    def _dense_proposals(
        self, pixel_values: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Dense proposals of each image, the RoI head's softmax scores on them, and the transformed image sizes.

        Drawn in eval mode without gradients (the RPN needs targets in training mode).
        """
        with eval_mode(self.model), torch.no_grad(), dense_rpn(self.model.rpn, self.settings):
            images = self._transform(pixel_values)
            features = self._features(images)
            dense, _ = self.model.rpn(images, features)
            logits = self._class_logits(features, dense, images.image_sizes)
        return dense, list(logits.softmax(1).split([len(p) for p in dense])), list(images.image_sizes)

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Re-select the targets of the images that are due (``reselect_every``), then recompute the active set.

        Shape:
            ``images``: ``(R, 3, H, W)``; returns ``(R,)`` bool: no active target left.
        """
        picked = rows_list(rows, self.size)
        if self.reselect_every:
            due = [
                j for j, r in enumerate(picked) if self._refreshes[r] and self._refreshes[r] % self.reselect_every == 0
            ]
            for r in picked:
                self._refreshes[r] += 1
            if due:
                self._reselect(images[due], [picked[j] for j in due])
        return super().refresh(images, rows)

    def _reselect(self, images: torch.Tensor, rows: list[int]) -> None:
        """Targets of ``rows`` selected again on their current iterates ``images`` (same rule, same ``pi``)."""
        dense, scores, _ = self._dense_proposals(images)
        for j, r in enumerate(rows):
            keep, assigned = self._select(dense[j], scores[j], *self._truth[r])
            self.proposals[r] = dense[j][keep]
            self.labels[r] = assigned
            self.adversarial[r] = self._pis[r][assigned]
            self.active[r] = torch.ones_like(assigned, dtype=torch.bool)
            self.reselections[r] += 1

    def _select(
        self, proposals: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive proposals (section 3.2) and their labels.

        Shape:
            ``proposals``: ``(P, 4)``; ``scores``: ``(P, C)`` softmax; ``gt_boxes``: ``(G, 4)`` in the proposals'
            coordinates; returns the kept indices ``(N,)`` and their classes ``(N,)``.
        """
        if gt_boxes.numel() == 0 or proposals.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=proposals.device)
            return empty, empty
        iou = box_iou(proposals, gt_boxes)  # (P, G)
        score = scores[:, gt_labels]  # (P, G): each proposal's confidence in each box's class
        qualifies = iou.gt(self.settings.iou_threshold) & score.gt(self.settings.score_threshold)
        best = iou.masked_fill(~qualifies, -1.0).argmax(1)
        keep = torch.nonzero(qualifies.any(1)).squeeze(1)
        return keep, gt_labels[best[keep]]

    def _transform(self, images: torch.Tensor) -> ImageList:
        # Eval mode fixes the resize target (training mode may draw one of several sizes), so the proposals' fixed
        # coordinates stay valid on every iterate; the transform has no parameters, only that flag matters.
        with eval_mode(self.model.transform):
            image_list, _ = self.model.transform(list(images))
        return image_list

    def _features(self, images: ImageList) -> OrderedDict[str, torch.Tensor]:
        features = self.model.backbone(images.tensors)
        return OrderedDict([("0", features)]) if isinstance(features, torch.Tensor) else features

    def _class_logits(
        self, features: OrderedDict[str, torch.Tensor], proposals: list[torch.Tensor], sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(features, proposals, sizes)
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
        return class_logits

    def target_logits(self, images: torch.Tensor, rows: list[int], subsets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI head's class logits on the chosen fixed proposals of each row. Shape: ``(n_i, C)`` each."""
        transformed = self._transform(images)
        boxes = [self.proposals[r][subset] for r, subset in zip(rows, subsets, strict=True)]
        logits = self._class_logits(self._features(transformed), boxes, [self.image_sizes[r] for r in rows])
        return list(logits.split([len(b) for b in boxes]))
