"""The optimisation attack of Liu et al. 2017 (section 3.1): Adam on a tanh-space variable, no budget.

``argmin_x' loss(x') + lambda ||x' - x||_2^2`` with the image written as ``x' = (tanh(y + w) + 1) / 2`` (the box
trick of :mod:`modules.attacks.tanh_box`), so every iterate lies in [0, 1]; Adam runs for ``iterations`` steps from
``w = 0`` (the clean image) and the last iterate is returned. There is no ``c`` search: Liu et al. 2017 set
``lambda = 0`` and control the distortion with the learning rate and the number of iterations, so
``distance_weight`` defaults to 0. With an ensemble objective (:class:`~modules.victims.ensemble.EnsembleObjective`)
this is their ensemble attack (eq. 6); Liu et al. sum the members' Adam updates, here Adam runs on the gradient of the
ensemble objective itself.

``stop_on_success`` (off by default, Liu et al. run every iteration): an image leaves the batch at the first iterate
that the objective's free check (``loss_and_success``: for a captioner, every teacher-forced top-1 word is the
target's, which makes the greedy caption the target) calls a success, and that iterate is its result. Later
iterations then pay only for the images still failing, no success is lost to Adam's oscillation, and a success costs
no more distortion than it needed. An objective without such a check (a non-targeted one, a mixture) runs every
iteration as before. As in Show-and-Fool's abort-early, an image's result does not depend on the others of its batch.
"""

from __future__ import annotations

import math

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import check_count, check_positive, is_real
from modules.attacks.protocol import Attack, AttackResult, Objective
from modules.attacks.registry import register_attack
from modules.attacks.tanh_box import RowAdam, from_tanh_space, to_tanh_space


@register_attack("optimization", summary="Adam in tanh space, no budget (Liu et al. 2017)")
class Optimization(Attack):
    """Adam in tanh space on the objective plus ``lambda`` times the squared L2 distortion.

    Args:
        iterations: Adam iterations.
        lr: Adam learning rate (in tanh space).
        distance_weight: ``lambda``, the weight of ``||x' - x||_2^2`` (Liu et al. 2017 use 0).
        use_eval_mode: Differentiate the victim in eval mode (no dropout).
        stop_on_success: Freeze an image at its first iterate the objective's ``loss_and_success`` check calls a
            success (module docstring).

    Raises:
        RobucapError: ``iterations`` < 1, ``lr`` not > 0 or ``distance_weight`` < 0.
    """

    def __init__(
        self,
        iterations: int = 300,
        lr: float = 0.005,
        distance_weight: float = 0.0,
        use_eval_mode: bool = True,
        stop_on_success: bool = False,
    ) -> None:
        super().__init__(use_eval_mode=use_eval_mode)
        self.iterations = check_count(iterations, "optimization attack iterations")
        self.lr = check_positive(lr, "optimization attack lr")
        if not is_real(distance_weight) or not (0 <= float(distance_weight) < math.inf):
            raise RobucapError(f"optimization attack distance_weight (lambda) must be >= 0, got {distance_weight!r}")
        self.distance_weight = float(distance_weight)
        self.stop_on_success = bool(stop_on_success)

    def run(self, objective: Objective, pixel_values: torch.Tensor) -> AttackResult:
        """The last Adam iterate (with ``stop_on_success``: an image's first successful iterate, where it had one).

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1].
        """
        with torch.inference_mode(False):
            # Tensors created under inference_mode cannot join autograd: clone them outside it.
            x = pixel_values.clone()
            y = to_tanh_space(x)
            w = torch.zeros_like(x)
            adam = RowAdam(w, self.lr)
            active = torch.arange(x.shape[0], device=x.device)
            used = torch.zeros(x.shape[0], dtype=torch.long)
            for _ in range(self.iterations):
                if active.numel() == 0:
                    break
                # Every row still running: no row selection (the objective's own batch order, as before early stops).
                rows = None if active.numel() == x.shape[0] else active
                w_var = w[active].requires_grad_(True)
                with torch.enable_grad():
                    image = from_tanh_space(y[active], w_var)
                    if self.stop_on_success:
                        value, checked = objective.loss_and_success(image, rows)
                    else:
                        value, checked = objective.loss(image, rows), None
                    if self.distance_weight > 0:
                        value = value + self.distance_weight * (image - x[active]).flatten(1).pow(2).sum(1)
                    # Each image's loss depends only on its own image (eval mode): one backward serves the batch.
                    (grad,) = torch.autograd.grad(value.sum(), [w_var])
                if checked is not None and bool(checked.any()):
                    # Done: these rows keep the iterate just checked (w is not stepped) and leave the batch.
                    going = ~checked.to(device=x.device, dtype=torch.bool)
                    active, grad = active[going], grad[going]
                    if active.numel() == 0:
                        break
                adam.step(grad.detach(), active)
                used[active.cpu()] += 1
            adversarial = from_tanh_space(y, w).clamp(0.0, 1.0)
        return self.finish(objective, x, adversarial, used)
