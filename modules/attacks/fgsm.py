"""Fast Gradient Sign Method (Goodfellow et al. 2015), the attack of Rashid & Rivas 2024, and its random-start variant.

Plain FGSM is one signed gradient step of size epsilon down the objective: ``x' = clip(x - eps * sign(grad))``. The
objective carries the direction: an untargeted caption objective is the negative cross-entropy of the reference, so
the step raises that cross-entropy (``clip(x + eps * sign(grad CE))``); a targeted one lowers the target's
(Liu et al. 2017, section 2.2, where the method is called FGS). With ``random_start`` it becomes the "fast
adversarial training" attack of Wong et al. 2020: start at a uniform point of the epsilon-ball, take one signed step
of ``step_size`` (default 1.25 * epsilon) and project back onto the ball and [0, 1].
"""

from __future__ import annotations

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import BudgetAttack, check_step_size, project_linf, uniform_start
from modules.attacks.protocol import Objective, input_gradient
from modules.attacks.registry import register_attack

# Wong et al. 2020, "Fast is better than free": alpha = 1.25 * epsilon works best with a random start.
RS_STEP_FACTOR = 1.25


# Decorators apply bottom up: fgsm registers first. Plain FGSM steps by exactly epsilon from the clean image, so its
# random start and step size are fixed, not options.
@register_attack("fgsm_rs", fixed={"random_start": True}, summary="FGSM from a random start (Wong et al. 2020)")
@register_attack(
    "fgsm",
    aliases=("fgs",),  # Liu et al. 2017's name
    fixed={"random_start": False, "step_size": None},
    summary="one signed gradient step (Goodfellow et al. 2015; Rashid & Rivas 2024)",
)
class FGSM(BudgetAttack):
    """One signed gradient step within an L-infinity budget.

    Args:
        epsilon: L-infinity budget in [0, 1] pixel units (Rashid & Rivas's (2024) 0.1 on ViT's [-1, 1] input is 0.05
            here).
        use_eval_mode: Compute the gradient with the model in eval mode (no dropout).
        random_start: Start from ``x + U(-epsilon, epsilon)`` (Wong et al. 2020) instead of ``x``.
        step_size: Size of the signed step with ``random_start`` (default ``1.25 * epsilon``); plain FGSM always
            steps by exactly ``epsilon``.

    Raises:
        RobucapError: ``epsilon`` outside [0, 1], ``step_size`` not > 0, or ``step_size`` without ``random_start``.

    Example:
        >>> attack = FGSM(epsilon=8 / 255)
        >>> result = attack(CaptionObjective(captioner, batch["labels"]), batch["pixel_values"])  # doctest: +SKIP
    """

    def __init__(
        self,
        epsilon: float,
        use_eval_mode: bool = True,
        random_start: bool = False,
        step_size: float | None = None,
    ) -> None:
        super().__init__(epsilon, use_eval_mode=use_eval_mode)
        self.random_start = bool(random_start)
        if step_size is not None and not self.random_start:
            # A plain FGSM step larger than epsilon is cut back to epsilon anyway; a smaller one is a weaker attack
            # that should be asked for with a smaller epsilon.
            raise RobucapError("FGSM step_size is only used with random_start=True (plain FGSM steps by epsilon)")
        self.step_size = None if step_size is None else check_step_size(step_size)

    def perturb(self, objective: Objective, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Adversarial images after one gradient evaluation.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H, W)``.
        """
        x = pixel_values
        if not self.random_start:
            grad, _ = input_gradient(objective, x)
            # Exactly the paper's formula: no projection, clipping to the pixel range is the only correction.
            return (x - self.epsilon * grad.sign()).clamp(0.0, 1.0), 1
        step = RS_STEP_FACTOR * self.epsilon if self.step_size is None else self.step_size
        start = uniform_start(x, self.epsilon)
        grad, _ = input_gradient(objective, start)
        return project_linf(start - step * grad.sign(), x, self.epsilon), 1
