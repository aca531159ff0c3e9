"""The one attack protocol: an attack minimises an objective that the victim supplies, and returns one typed result.

An :class:`Objective` is a victim's differentiable per-image loss, bound to one batch's goals (a reference caption to
move away from, a target caption, keywords, a detector's ground-truth boxes, ...), oriented so that **the attack
lowers it**: an untargeted caption objective is the negative cross-entropy of the reference caption, a targeted one
the target's margin loss. Attacks (:class:`Attack` subclasses, one per file) know nothing about captioners: they call
``objective.loss`` (and, where they stop on success, ``objective.success``) on images in [0, 1], so a detector or a
segmenter brings its own objective without touching any attack file.

Every attack is called the same way, ``attack(objective, pixel_values) -> AttackResult``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from datamodules.errors import RobucapError


class Objective(ABC):
    """A victim's per-image adversarial loss for one batch of goals; the attack minimises it.

    Subclasses hold the victim model and the batch's goals (labels, targets, boxes). ``rows`` selects a subset of
    the batch the objective was built for, so attacks that drop finished images (Show-and-Fool's abort-early, DAG's
    empty active sets) can keep evaluating the others.

    Attributes:
        module: The model whose train/eval mode the attack sets while differentiating (never a DDP wrapper).
        size: The number of rows (images) the objective was built for; ``None`` if it accepts any batch.
        moving_target: ``refresh`` changes what ``loss`` measures (Show-and-Fool's keyword objective re-infers the
            caption it scores), so a loss that stops falling says nothing until the goal is reached: attacks that
            stop early on a stalled loss then wait for a success.
    """

    module: nn.Module
    size: int | None = None
    moving_target: bool = False

    @abstractmethod
    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image loss to minimise, differentiable with respect to ``images``.

        Args:
            images: Candidate images in [0, 1] for the selected rows.
            rows: Indices into the batch the objective was built for; ``None``: every row, in order.

        Shape:
            ``images``: ``(R, C, H, W)``; ``rows``: ``(R,)``; returns ``(R,)``.
        """

    def loss_and_success(
        self, images: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and, where the same forward pass tells, whether each image already reaches the goal.

        Optimisation attacks that keep their best successful iterate (Show-and-Fool) call this every iteration, so
        the check must be free: a captioner's teacher-forced check (every position's top-1 word is the target's)
        qualifies, a generated caption does not. Default: no check (``None``).

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` and ``(R,)`` bool (on the CPU) or ``None``.
        """
        return self.loss(images, rows), None

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Whether each image already reaches the goal (e.g. the generated caption is the target).

        ``None`` where success is not defined (an untargeted loss has no finish line). Called without gradients.

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` bool or ``None``.
        """
        return None

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Re-derive whatever the objective conditions on from the current images (default: nothing).

        Iterative attacks call it every few iterations; Show-and-Fool's keyword objective re-infers the caption it
        scores here. Called without gradients.

        Returns:
            Whether each image reaches the goal, where re-deriving found it out on the way (the keyword objective's
            freshly generated captions), else ``None``.

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` bool (on the CPU) or ``None``.
        """
        return None


@dataclass
class AttackResult:
    """What an attack returns for a batch.

    Attributes:
        adversarial: Adversarial images in [0, 1], detached. Shape: ``(B, C, H, W)``.
        success: Whether each image reaches the objective's goal; ``None`` where the objective defines none.
            Shape: ``(B,)`` bool.
        iterations: Gradient evaluations spent on each image. Shape: ``(B,)`` long.
        linf: ``max |adversarial - clean|`` per image, [0, 1] pixel units. Shape: ``(B,)``.
        l2: ``||adversarial - clean||_2`` per image, [0, 1] pixel units. Shape: ``(B,)``.
    """

    adversarial: torch.Tensor
    success: torch.Tensor | None
    iterations: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor

    @classmethod
    def measure(
        cls,
        clean: torch.Tensor,
        adversarial: torch.Tensor,
        iterations: torch.Tensor | int,
        success: torch.Tensor | None = None,
    ) -> AttackResult:
        """Build a result, measuring the distortion of ``adversarial`` against ``clean``.

        Shape:
            ``clean`` and ``adversarial``: ``(B, C, H, W)``; ``iterations``: ``(B,)`` or one int for every image.
        """
        delta = (adversarial.detach() - clean.detach()).flatten(1).float()
        if not isinstance(iterations, torch.Tensor):
            iterations = torch.full((clean.shape[0],), int(iterations), dtype=torch.long, device=clean.device)
        return cls(
            adversarial=adversarial.detach(),
            success=None if success is None else success.detach().bool(),
            iterations=iterations.detach().long(),
            linf=delta.abs().amax(1) if delta.shape[1] else delta.new_zeros(delta.shape[0]),
            l2=delta.norm(dim=1),
        )


@contextmanager
def eval_mode(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Temporarily switch ``module`` (and its children) to eval mode, then restore every submodule's own flag."""
    if not enabled:
        yield
        return
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def input_gradient(
    objective: Objective, images: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-image objective with respect to the images, usable anywhere.

    Attacks run inside training steps and inside validation, where Lightning enables ``torch.inference_mode`` (or
    ``no_grad`` under gloo): autograd is re-enabled locally, only the images are differentiated (parameters'
    ``.grad`` are never touched and DDP's gradient hooks never fire). The caller sets the model's mode
    (:func:`eval_mode`). Each image's loss is its own, so an image's gradient does not depend on the batch.

    Returns:
        ``(gradient, per_image_loss)``, both detached.

    Shape:
        ``images``: ``(R, C, H, W)``; returns ``(R, C, H, W)`` and ``(R,)``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors created under inference_mode cannot join autograd: clone them outside it.
        x = images.detach().clone().requires_grad_(True)
        per_image = objective.loss(x, rows)
        (grad,) = torch.autograd.grad(per_image.sum(), [x])
    return grad.detach(), per_image.detach()


class Attack(ABC):
    """An attack in [0, 1] pixel space: ``attack(objective, pixel_values) -> AttackResult``.

    Subclasses implement :meth:`run`; the victim is already in the requested train/eval mode there, and is put back
    in the modes it had (every submodule's own flag) when the call returns.

    Args:
        use_eval_mode: Differentiate the victim in eval mode (no dropout), restoring its modes afterwards.
    """

    def __init__(self, use_eval_mode: bool = True) -> None:
        self.use_eval_mode = bool(use_eval_mode)

    def __repr__(self) -> str:
        # Logged next to results, so every option that changes the attack should show up.
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"

    def __call__(self, objective: Objective, pixel_values: torch.Tensor) -> AttackResult:
        """Attack a batch.

        Raises:
            RobucapError: ``pixel_values`` is not a batch of images, or not as many as the objective was built for.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1]; the result's images have the same shape.
        """
        if pixel_values.dim() != 4 or (objective.size is not None and pixel_values.shape[0] != objective.size):
            expected = "B" if objective.size is None else str(objective.size)
            raise RobucapError(
                f"{type(self).__name__} expects pixel_values ({expected}, C, H, W) for an objective built for "
                f"{objective.size} images, got {tuple(pixel_values.shape)}"
            )
        with eval_mode(objective.module, self.use_eval_mode):
            return self.run(objective, pixel_values.detach())

    @abstractmethod
    def run(self, objective: Objective, pixel_values: torch.Tensor) -> AttackResult:
        """Compute the result (the victim is already in the requested mode)."""

    @staticmethod
    def finish(
        objective: Objective, clean: torch.Tensor, adversarial: torch.Tensor, iterations: torch.Tensor | int
    ) -> AttackResult:
        """The result of an attack that does not track success itself: the objective judges the final images.

        Shape:
            ``clean`` and ``adversarial``: ``(B, C, H, W)``; ``iterations``: ``(B,)`` or one int for every image.
        """
        with torch.no_grad():
            success = objective.success(adversarial.detach())
        return AttackResult.measure(clean, adversarial, iterations, success)
