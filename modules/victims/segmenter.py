"""A semantic segmenter as a dense victim: every non-background pixel is a DAG target (Xie et al. 2017, sec. 3.2).

Targets are the pixels whose **ground-truth** class is a foreground class, labelled with it (the paper's
``L``; background and ignored pixels are kept as they are, as the paper does "for implementation simplicity").
A pixel the clean model already gets wrong is a target that starts inactive. Without ground truth (transfer to
unlabelled images) :meth:`SegmenterObjective.own_predictions` takes the clean prediction as the labels instead.

``f(X, t_n)`` are the logits at pixel ``n`` of any torchvision segmentation model (``model(x)["out"]``) or of any
module returning ``(B, C, H, W)`` logits at the mask's resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.attacks.protocol import eval_mode
from modules.victims.dense import DenseObjective, adversarial_permutation, image_seeds

IGNORE_INDEX = 255
"""Mask value of pixels that are no target (VOC's boundary label; also used by torchvision's references)."""


def segmentation_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The per-pixel class logits of a segmenter: ``model(x)["out"]`` (torchvision) or ``model(x)``.

    Raises:
        RobucapError: The model returns neither a ``(B, C, H, W)`` tensor nor a mapping with one under ``"out"``.

    Shape:
        ``images``: ``(B, 3, H, W)`` in [0, 1]; returns ``(B, C, H', W')``.
    """
    out = model(images)
    if isinstance(out, Mapping):
        out = out.get("out")
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != images.shape[0]:
        raise RobucapError(
            f"a segmenter must return (B, C, H, W) logits or a dict with them under 'out'; {type(model).__name__} "
            f"returned {type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
        )
    return out


class SegmenterObjective(DenseObjective):
    """DAG's objective on a segmenter: the foreground pixels of each image, each pushed to ``pi(class)``.

    Args:
        model: The segmenter (a torchvision segmentation model or a module returning logits), not a Lightning
            wrapper.
        pixel_values: The clean images (used to check the shapes and count the classes). Shape: ``(B, 3, H, W)``.
        masks: Ground-truth class per pixel, ``ignore_index`` where unlabelled, at the logits' resolution.
            Shape: ``(B, H', W')`` long.
        seeds: Seeds of the per-image class permutations (:func:`~modules.victims.dense.image_seeds`).
        background: The background class (no target, kept by ``pi``).
        ignore_index: Mask value of pixels that are no target.
        shrink_only: A pixel that left the active set never comes back (default: the paper's recomputed set).
        use_eval_mode: Run the clean forward pass in eval mode.
        margin: Keep a pixel active until its true class is this far below the best other class (0: the paper's
            rule; :class:`~modules.victims.dense.DenseObjective`).

    Raises:
        RobucapError: Masks of another shape than the logits', or values that are no class of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        masks: torch.Tensor,
        seeds: int | Sequence[int] = 0,
        background: int = 0,
        ignore_index: int = IGNORE_INDEX,
        shrink_only: bool = False,
        use_eval_mode: bool = True,
        margin: float = 0.0,
    ) -> None:
        with eval_mode(model, use_eval_mode), torch.no_grad():
            logits = segmentation_logits(model, pixel_values)
        b, classes, h, w = logits.shape
        if tuple(masks.shape) != (b, h, w):
            raise RobucapError(
                f"segmentation masks must have shape (B, H, W) = {(b, h, w)} like the model's logits, got "
                f"{tuple(masks.shape)}"
            )
        masks = masks.long().to(logits.device)
        bad = masks.ne(ignore_index) & (masks.lt(0) | masks.ge(classes))
        if bad.any():
            raise RobucapError(
                f"segmentation masks hold classes {sorted(set(masks[bad].tolist()))[:5]} outside the model's "
                f"{classes} classes (and the ignore value {ignore_index})"
            )
        self.model = model
        self.num_classes = classes
        self.pixels = []
        labels, adversarial = [], []
        for seed, mask in zip(image_seeds(seeds, b), masks, strict=True):
            flat = mask.flatten()
            index = torch.nonzero(flat.ne(ignore_index) & flat.ne(background)).squeeze(1)
            pi = adversarial_permutation(classes, seed, background).to(flat.device)
            self.pixels.append(index)
            labels.append(flat[index])
            adversarial.append(pi[flat[index]])
        super().__init__(model, labels, adversarial, shrink_only=shrink_only, margin=margin)

    @classmethod
    def own_predictions(
        cls,
        model: nn.Module,
        pixel_values: torch.Tensor,
        seeds: int | Sequence[int] = 0,
        background: int = 0,
        shrink_only: bool = False,
        use_eval_mode: bool = True,
        margin: float = 0.0,
    ) -> SegmenterObjective:
        """The objective with the clean prediction as labels (images without ground truth).

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1].
        """
        with eval_mode(model, use_eval_mode), torch.no_grad():
            masks = segmentation_logits(model, pixel_values).argmax(1)
        return cls(
            model, pixel_values, masks, seeds, background, shrink_only=shrink_only, use_eval_mode=use_eval_mode,
            margin=margin,
        )  # fmt: skip

    def target_logits(self, images: torch.Tensor, rows: list[int], subsets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The logits of the chosen pixels of each row. Shape: ``(n_i, C)`` each."""
        logits = segmentation_logits(self.model, images).flatten(2)  # (R, C, H'W')
        return [
            logits[j][:, self.pixels[r][subset]].t() for j, (r, subset) in enumerate(zip(rows, subsets, strict=True))
        ]
