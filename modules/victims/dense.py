"""What the dense victims share (Dense Adversary Generation, Xie et al. 2017): targets, adversarial labels, active set.

A dense victim classifies many **targets** per image: pixels (a segmenter), proposals (a detector), token positions
(a captioner). Each target ``t_n`` has a true class ``l_n`` and an adversarial class ``l'_n = pi(l_n)``, where ``pi``
is a random permutation of the classes drawn **per image** with no fixed point (section 3.1; the background, where
there is one, stays background and is never a target). The **active set** is the targets still classified as their
true class; the loss over it,

    L = sum over active n of ( f_{l_n}(X, t_n) - f_{l'_n}(X, t_n) ),

is what DAG lowers (its gradient is minus the paper's ``r_m``). :class:`DenseObjective` holds all that per image; a
victim only says how to compute the class scores ``f(X, t_n)`` of a set of its targets (:meth:`target_logits`).

Randomness: image ``i``'s permutation comes from a generator seeded with its own seed (:func:`image_seeds`), so an
image gets the same adversarial labels alone as in any batch.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.attacks.protocol import Objective

__all__ = [
    "DenseObjective",
    "adversarial_permutation",
    "derangement",
    "image_seeds",
    "rows_list",
]


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point.

    Rejection sampling: about ``e`` draws on average (half of them for ``n = 2``), each one ``randperm``.

    Raises:
        RobucapError: ``n < 2`` (one element cannot move).

    Shape:
        returns ``(n,)`` long, ``out[i] != i`` for every ``i``.
    """
    if n < 2:
        raise RobucapError(f"a permutation without fixed point needs at least 2 classes to swap, got {n}")
    identity = torch.arange(n)
    while True:
        candidate = torch.randperm(n, generator=generator)
        if not candidate.eq(identity).any():
            return candidate


def adversarial_permutation(num_classes: int, seed: int, background: int | None = 0) -> torch.Tensor:
    """DAG's ``pi``: every foreground class goes to another foreground class; the background stays put.

    Args:
        num_classes: Classes ``C`` of the victim, background included.
        seed: The image's seed (:func:`image_seeds`).
        background: Index of the background class (kept as background, as the paper does), or ``None``.

    Raises:
        RobucapError: Fewer than two foreground classes, or a background index outside ``[0, C)``.

    Shape:
        returns ``(C,)`` long with ``pi[c] != c`` for every foreground ``c``.
    """
    if background is not None and not 0 <= background < num_classes:
        raise RobucapError(f"background class {background} is not one of the victim's {num_classes} classes")
    foreground = torch.tensor([c for c in range(num_classes) if c != background], dtype=torch.long)
    if foreground.numel() < 2:
        raise RobucapError(
            f"DAG needs at least 2 foreground classes to permute, the victim has {foreground.numel()} "
            f"({num_classes} classes, background {background})"
        )
    generator = torch.Generator().manual_seed(int(seed))
    pi = torch.arange(num_classes)
    pi[foreground] = foreground[derangement(foreground.numel(), generator)]
    return pi


def image_seeds(seeds: int | Sequence[int], count: int) -> list[int]:
    """One seed per image: ``seed + i`` for image ``i`` of the batch, or the given list (e.g. dataset indices).

    Pass one seed per image to make an image's adversarial labels independent of the batch it is attacked in.

    Raises:
        RobucapError: A list of the wrong length, or seeds that are not integers.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise RobucapError(f"seeds must be an integer or one integer per image, got {seeds!r}")
    out = [int(seeds) + i for i in range(count)] if isinstance(seeds, int) else list(seeds)
    if len(out) != count or not all(isinstance(s, int) and not isinstance(s, bool) for s in out):
        raise RobucapError(f"expected one integer seed per image ({count}), got {list(out)!r}")
    return out


def rows_list(rows: torch.Tensor | None, count: int) -> list[int]:
    """The batch rows an objective call covers, as Python ints (``None``: all of them, in order)."""
    return list(range(count)) if rows is None else [int(r) for r in rows.tolist()]


class DenseObjective(Objective):
    """Per-image targets with true and adversarial classes, and the active set DAG shrinks.

    Subclasses implement :meth:`target_logits`. ``refresh`` recomputes the active set on the current images and
    says which images are done (no active target); ``loss`` is ``sum over active (f_l - f_l')`` per image, so a
    target that is already misclassified contributes nothing; ``success`` is "no target is classified as its true
    class" on the given images (an image without targets is trivially done: see :meth:`target_counts`).

    Args:
        module: The victim model (whose train/eval mode the attack sets).
        labels: Per image, the targets' true classes. Shape: ``(N_i,)`` long each.
        adversarial: Per image, the targets' adversarial classes ``pi(l)``. Shape: ``(N_i,)`` long each.
        shrink_only: A target that left the active set never comes back, so the set never grows; "done" then
            means every target was misclassified at some iteration, not necessarily all at once (targets that
            interact, like neighbouring pixels, revert: :meth:`fooled_counts` tells). Off (the paper's
            Algorithm 1): the active set is recomputed over **all** targets each iteration, so a target that reverts
            to its true class is attacked again, and "done" means every target is misclassified at once.
        margin: Beyond the paper (which stops a target as soon as its true class is no longer the top one): a target
            stays active until its true class's score is at least ``margin`` below the best other class's,
            ``f_l - max_{c != l} f_c <= -margin``. 0 (default) is the paper's rule. A margin pushes the true class
            further down, e.g. below a detector's score threshold, at the price of more iterations and distortion.
            ``fooled_counts`` and ``success`` still count a target as fooled as soon as its top class is wrong.

    Attributes:
        active: Per image, which targets are active. Shape: ``(N_i,)`` bool each.
    """

    def __init__(
        self,
        module: nn.Module,
        labels: Sequence[torch.Tensor],
        adversarial: Sequence[torch.Tensor],
        shrink_only: bool = False,
        margin: float = 0.0,
    ) -> None:
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin >= 0:
            raise RobucapError(f"DAG margin must be a number >= 0 (0: the paper's rule), got {margin!r}")
        if len(labels) != len(adversarial):
            raise ValueError(f"{len(labels)} label sets for {len(adversarial)} adversarial label sets")
        self.module = module
        self.labels = [torch.as_tensor(t).long() for t in labels]
        self.adversarial = [torch.as_tensor(t).long() for t in adversarial]
        for true, adv in zip(self.labels, self.adversarial, strict=True):
            if true.shape != adv.shape or true.eq(adv).any():
                raise ValueError("every target needs an adversarial class different from its true class")
        self.active = [torch.ones_like(t, dtype=torch.bool) for t in self.labels]
        self.shrink_only = bool(shrink_only)
        self.margin = float(margin)
        self.size = len(self.labels)

    @abstractmethod
    def target_logits(self, images: torch.Tensor, rows: list[int], subsets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class scores ``f(X, t_n)`` (before softmax) of a subset of each image's targets.

        Args:
            images: The selected rows' images in [0, 1].
            rows: Which images of the batch (indices into the objective's per-image lists).
            subsets: Per row, which of its targets to score (a mask over its ``N_i`` targets).

        Returns:
            Per row, the scores of the chosen targets, in target order, differentiable with respect to ``images``.

        Shape:
            ``images``: ``(R, C, H, W)``; ``subsets``: ``(N_i,)`` bool each; returns ``(n_i, classes)`` each.
        """

    def target_counts(self) -> torch.Tensor:
        """Targets per image (0: the image was skipped, e.g. no ground-truth object). Shape: ``(B,)`` long."""
        return torch.tensor([t.numel() for t in self.labels], dtype=torch.long)

    def active_counts(self) -> torch.Tensor:
        """Active targets per image after the last ``refresh``. Shape: ``(B,)`` long."""
        return torch.tensor([int(a.sum()) for a in self.active], dtype=torch.long)

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``sum over active (f_l - f_l')`` per image: lowering it pushes every active target to its adversarial
        class. Shape: ``images`` ``(R, C, H, W)``; returns ``(R,)``."""
        picked = rows_list(rows, self.size)
        logits = self.target_logits(images, picked, [self.active[r] for r in picked])
        values = []
        for r, scores in zip(picked, logits, strict=True):
            active = self.active[r]
            true = self.labels[r][active].to(scores.device).unsqueeze(1)
            adversarial = self.adversarial[r][active].to(scores.device).unsqueeze(1)
            values.append((scores.gather(1, true) - scores.gather(1, adversarial)).sum())
        loss = torch.stack(values)
        if not loss.requires_grad and images.requires_grad:
            # No selected image has an active target: a zero that depends on the images keeps autograd.grad defined.
            loss = loss + 0.0 * images.flatten(1).sum(1)
        return loss

    def _still_true(
        self, images: torch.Tensor, picked: list[int], subsets: list[torch.Tensor], margin: float = 0.0
    ) -> list[torch.Tensor]:
        """Per row, a mask over all its targets: in ``subsets`` and classified as the true class (with ``margin``:
        the true class not yet ``margin`` below the best other class)."""
        with torch.no_grad():
            logits = self.target_logits(images, picked, subsets)
        out = []
        for r, subset, scores in zip(picked, subsets, logits, strict=True):
            mask = torch.zeros_like(self.active[r])
            true = self.labels[r][subset].to(scores.device)
            if margin > 0:
                own = scores.gather(1, true.unsqueeze(1)).squeeze(1)
                best_other = scores.scatter(1, true.unsqueeze(1), float("-inf")).amax(1)
                mask[subset] = (own - best_other).gt(-margin).to(mask.device)
            else:
                mask[subset] = scores.argmax(1).eq(true).to(mask.device)
            out.append(mask)
        return out

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute the active set of the selected images (Algorithm 1, line 3) and say which are done.

        Returns:
            Whether each image has no active target left (on the CPU).

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` bool.
        """
        picked = rows_list(rows, self.size)
        subsets = [self.active[r] if self.shrink_only else torch.ones_like(self.active[r]) for r in picked]
        for r, mask in zip(picked, self._still_true(images, picked, subsets, self.margin), strict=True):
            self.active[r] = mask
        return torch.tensor([not bool(self.active[r].any()) for r in picked], dtype=torch.bool)

    def fooled_counts(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Targets per image no longer classified as their true class (the active set is left as it is).

        ``fooled_counts / target_counts`` is the flip rate (a captioner's token flip rate).

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` long.
        """
        picked = rows_list(rows, self.size)
        masks = self._still_true(images, picked, [torch.ones_like(self.active[r]) for r in picked])
        return torch.tensor([int((~m).sum()) for m in masks], dtype=torch.long)

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """No target of the image is classified as its true class. Shape: ``(R,)`` bool (on the CPU)."""
        picked = rows_list(rows, self.size)
        return self.fooled_counts(images, rows).eq(self.target_counts()[picked])
