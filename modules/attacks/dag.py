"""Dense Adversary Generation (DAG, Xie et al. 2017, Algorithm 1): misclassify every target of a dense victim.

The victim's objective (:class:`~modules.victims.dense.DenseObjective`: a segmenter's pixels, a detector's
proposals, a captioner's content tokens) holds per image the targets, their true classes ``l``, their adversarial
classes ``l' = pi(l)`` and the **active set** (targets still classified as ``l``). Each iteration ``m``:

1. ``objective.refresh(X_m, rows)`` recomputes the active set of every image still running and says which have
   none left; those leave the batch (their iterate is final).
2. ``r_m = grad_X sum over active (f_{l'} - f_l)``, i.e. minus the gradient of ``objective.loss``.
3. ``r'_m = gamma * r_m / ||r_m||_inf`` per image, so every step's L-infinity norm is exactly ``gamma``.
4. ``X_{m+1} = clip(X_m + r'_m, 0, 1)``.

It stops when every image is done or after ``max_iterations`` steps (the paper's ``M_0``: 200 for segmentation,
150 for detection); images are refreshed once more after the last step, so ``success`` describes the returned image.

Units: robucap's images are in [0, 1], so the paper's ``gamma = 0.5`` (0-255 intensities) is ``0.5 / 255`` here.
The paper truncates once at the end; clipping every step keeps each iterate a valid image (with ``gamma`` a
fraction of an intensity level, the two differ only on pixels already at 0 or 1). The perturbation is therefore
``r = adversarial - clean`` (``= sum r'_m`` wherever no clipping happened).

Perceptibility (section 3.5.3): ``p = sqrt(1/K sum_k ||r_k||^2)`` over the ``K`` pixels, ``r_k`` the RGB vector
in [0, 1] units, is ``result.l2 / sqrt(K)``: :func:`perceptibility`.

Batching: each image has its own active set, step normalisation and stopping iteration, and its loss is its own,
so an image's perturbation does not depend on its batch (an image alone and in a batch get the same ``r``).
Benchmark note: the seconds per image of batch 1 against batch 16 are ``DAG(...)(objective, x)`` timed on a
16-image batch and on its 16 one-image slices (with one objective per slice, seeded per image).
"""

from __future__ import annotations

import math

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import check_count, check_positive
from modules.attacks.protocol import Attack, AttackResult, Objective, input_gradient
from modules.attacks.registry import register_attack

PAPER_GAMMA = 0.5 / 255
"""The paper's step ``gamma = 0.5`` in 0-255 intensities, in [0, 1] pixel units."""


def perceptibility(l2: torch.Tensor, pixels: int) -> torch.Tensor:
    """Xie et al.'s perceptibility ``p = sqrt(1/K sum_k ||r_k||^2)`` from the perturbation's L2 norm.

    Args:
        l2: ``||r||_2`` per image over all channels, [0, 1] units (``AttackResult.l2``). Shape: ``(B,)``.
        pixels: ``K``, pixels per image (``H * W``; the channels are inside each ``r_k``).

    Shape:
        returns ``(B,)``.
    """
    return l2 / math.sqrt(check_count(pixels, "pixels"))


@register_attack("dag", summary="Dense Adversary Generation on every target of a dense victim (Xie et al. 2017)")
class DAG(Attack):
    """Dense Adversary Generation: normalised gradient steps until no target keeps its true class.

    Args:
        gamma: Step size, the L-infinity norm of every step, in [0, 1] pixel units (paper: 0.5 / 255).
        max_iterations: Most steps per image (paper: 200 for segmentation, 150 for detection).
        use_eval_mode: Differentiate the victim in eval mode (no dropout), restoring its modes afterwards.

    Raises:
        RobucapError: ``gamma`` not > 0, ``max_iterations`` < 1; at attack time, an objective without an active
            set (its ``refresh`` returns ``None``).

    Example:
        >>> objective = SegmenterObjective(model, images, masks)
        >>> result = DAG(max_iterations=200)(objective, images)  # doctest: +SKIP
    """

    def __init__(self, gamma: float = PAPER_GAMMA, max_iterations: int = 150, use_eval_mode: bool = True) -> None:
        super().__init__(use_eval_mode=use_eval_mode)
        self.gamma = check_positive(gamma, "DAG gamma")
        self.max_iterations = check_count(max_iterations, "DAG max_iterations")

    def run(self, objective: Objective, pixel_values: torch.Tensor) -> AttackResult:
        """Attack a batch; every image stops on its own.

        Returns:
            The adversarial images, ``success`` (no active target left on the returned image), the steps taken per
            image, and their L-infinity and L2 distortion.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1].
        """
        with torch.inference_mode(False):
            # Tensors created under inference_mode cannot join autograd: clone them outside it.
            clean = pixel_values.clone()
            adversarial = clean.clone()
            b = clean.shape[0]
            iterations = torch.zeros(b, dtype=torch.long)
            success = torch.zeros(b, dtype=torch.bool)
            running = torch.arange(b)
            for m in range(self.max_iterations + 1):
                index = running.to(clean.device)
                done = objective.refresh(adversarial[index], index)
                if done is None:
                    raise RobucapError(
                        f"DAG needs a dense objective with an active set (its refresh says which images are done); "
                        f"{type(objective).__name__} has none"
                    )
                done = done.bool().cpu()
                success[running[done]] = True
                running = running[~done]
                if m == self.max_iterations or running.numel() == 0:
                    break
                index = running.to(clean.device)
                adversarial[index] = self.step(objective, adversarial[index], index)
                iterations[running] += 1
            return AttackResult.measure(clean, adversarial, iterations.to(clean.device), success.to(clean.device))

    def step(self, objective: Objective, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One DAG step on the running images: ``clip(X + gamma * r / ||r||_inf)``, ``r`` minus the loss gradient.

        An image whose gradient vanishes everywhere (no active target reachable) does not move.

        Shape:
            ``images``: ``(R, C, H, W)``; ``rows``: ``(R,)``; returns ``(R, C, H, W)``.
        """
        gradient, _ = input_gradient(objective, images, rows)
        r = -gradient
        norm = r.flatten(1).abs().amax(1).view(-1, *([1] * (r.dim() - 1)))
        # r / norm first: the largest entry becomes exactly +-1, so the step's L-infinity norm is exactly gamma.
        step = torch.where(norm > 0, r / norm.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(r)) * self.gamma
        return (images + step).clamp(0.0, 1.0)
