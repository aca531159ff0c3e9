"""Projected gradient descent in L-infinity (Madry et al. 2018); I-FGSM (Kurakin et al. 2017) without random start.

Each step moves every pixel by ``step_size`` against the sign of the objective's gradient (an untargeted caption
objective is the negative reference cross-entropy, so this raises the cross-entropy) and projects back onto the
epsilon-ball around the clean image and onto [0, 1].
"""

from __future__ import annotations

import torch

from modules.attacks.base import BudgetAttack, check_count, check_step_size, project_linf, uniform_start
from modules.attacks.protocol import Objective, input_gradient
from modules.attacks.registry import register_attack

# Madry et al. 2018 use alpha = 2.5 * epsilon / steps: enough to cross the ball and come back within the budget.
DEFAULT_STEP_FACTOR = 2.5


@register_attack("pgd", summary="iterated signed gradient steps with projection (Madry et al. 2018)")
class PGD(BudgetAttack):
    """Iterated signed gradient steps with L-infinity projection.

    Args:
        epsilon: L-infinity budget in [0, 1] pixel units.
        use_eval_mode: Compute gradients with the model in eval mode (no dropout).
        steps: Number of gradient steps (each costs one forward and backward pass).
        step_size: Size of each signed step in pixel units; default ``2.5 * epsilon / steps``.
        random_start: Start from a uniform point of the epsilon-ball (PGD) instead of the clean image (I-FGSM).

    Raises:
        RobucapError: ``epsilon`` outside [0, 1], ``steps`` < 1 or ``step_size`` not > 0.

    Example:
        >>> attack = PGD(epsilon=8 / 255, steps=10)
        >>> result = attack(CaptionObjective(captioner, batch["labels"]), batch["pixel_values"])  # doctest: +SKIP
    """

    def __init__(
        self,
        epsilon: float,
        use_eval_mode: bool = True,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
    ) -> None:
        super().__init__(epsilon, use_eval_mode=use_eval_mode)
        self.steps = check_count(steps, "PGD steps")
        self.step_size = DEFAULT_STEP_FACTOR * self.epsilon / steps if step_size is None else check_step_size(step_size)
        self.random_start = bool(random_start)

    def perturb(self, objective: Objective, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Adversarial images after ``steps`` gradient evaluations.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H, W)``.
        """
        x = pixel_values
        x_adv = uniform_start(x, self.epsilon) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad, _ = input_gradient(objective, x_adv)
            x_adv = project_linf(x_adv - self.step_size * grad.sign(), x, self.epsilon)
        return x_adv, self.steps
