"""Projected gradient descent in L-infinity (Madry et al., 2018); I-FGSM (Kurakin et al., 2017) without random start.

Each step moves every pixel by ``step_size`` along the sign of the caption-loss gradient (up for untargeted attacks,
down for targeted ones) and projects back onto the epsilon-ball around the clean image and onto [0, 1].
"""

from __future__ import annotations

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import Attack, check_step_size, eval_mode, input_gradient, project_linf, uniform_start
from modules.captioners.base import Captioner

# Madry et al. (2018) use alpha = 2.5 * epsilon / steps: enough to cross the ball and come back within the budget.
DEFAULT_STEP_FACTOR = 2.5


class PGD(Attack):
    """Iterated signed gradient steps with L-infinity projection.

    Args:
        epsilon: L-infinity budget in [0, 1] pixel units.
        targeted: Descend on the loss of the target caption given as ``labels``.
        use_eval_mode: Compute gradients with the model in eval mode (no dropout).
        steps: Number of gradient steps (each costs one forward and backward pass).
        step_size: Size of each signed step in pixel units; default ``2.5 * epsilon / steps``.
        random_start: Start from a uniform point of the epsilon-ball (PGD) instead of the clean image (I-FGSM).

    Raises:
        RobucapError: ``epsilon`` outside [0, 1], ``steps`` < 1 or ``step_size`` not > 0.

    Example:
        >>> attack = PGD(epsilon=8 / 255, steps=10)
        >>> adversarial = attack(captioner, batch["pixel_values"], batch["labels"])  # doctest: +SKIP
    """

    def __init__(
        self,
        epsilon: float,
        targeted: bool = False,
        use_eval_mode: bool = True,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
    ) -> None:
        super().__init__(epsilon, targeted=targeted, use_eval_mode=use_eval_mode)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise RobucapError(f"PGD steps must be an integer >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = DEFAULT_STEP_FACTOR * self.epsilon / steps if step_size is None else check_step_size(step_size)
        self.random_start = bool(random_start)

    def perturb(self, captioner: Captioner, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1]; ``labels``: ``(B, T)``; returns ``(B, 3, H, W)``.
        """
        x = pixel_values
        x_adv = uniform_start(x, self.epsilon) if self.random_start else x.clone()
        # Switch modes once for the whole loop rather than once per step (input_gradient then finds eval already).
        with eval_mode(captioner, self.use_eval_mode):
            for _ in range(self.steps):
                grad, _ = input_gradient(captioner, x_adv, labels, use_eval_mode=False)
                x_adv = project_linf(x_adv + self.step_size * self.direction(grad).sign(), x, self.epsilon)
        return x_adv
