"""A toy attack in one file: all that adding an attack takes, with one YAML (tests/fixtures/toy_attack.yaml).

Momentum iterative FGSM (MI-FGSM, Dong et al. 2018): signed steps along an accumulated, L1-normalised gradient,
projected onto the L-infinity ball. It implements :class:`~modules.attacks.base.BudgetAttack` and registers itself
with :func:`~modules.attacks.registry.register_attack`, so importing this file makes it ``build_attack("toy_momentum")``
and ``robucap attack toy_momentum`` (with ``--steps`` and ``--decay`` taken from its signature); nothing else in
robucap names it.
"""

from __future__ import annotations

import math

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import BudgetAttack, check_count, is_real, project_linf
from modules.attacks.protocol import Objective, input_gradient
from modules.attacks.registry import register_attack

# A zero gradient gives no direction: the image keeps its place instead of dividing by zero.
_TINY = 1e-12


@register_attack("toy_momentum", summary="momentum iterative FGSM (Dong et al. 2018), a toy attack of the tests")
class MomentumFGSM(BudgetAttack):
    """Iterated signed steps of ``epsilon / steps`` along a momentum of L1-normalised gradients.

    Args:
        epsilon: L-infinity budget in [0, 1] pixel units.
        use_eval_mode: Compute gradients with the model in eval mode (no dropout).
        steps: Gradient steps.
        decay: Momentum decay ``mu`` (0: plain iterated FGSM).

    Raises:
        RobucapError: ``epsilon`` outside [0, 1], ``steps`` < 1 or ``decay`` negative.
    """

    def __init__(self, epsilon: float, use_eval_mode: bool = True, steps: int = 5, decay: float = 1.0) -> None:
        super().__init__(epsilon, use_eval_mode=use_eval_mode)
        self.steps = check_count(steps, "toy_momentum steps")
        if not is_real(decay) or not 0 <= float(decay) < math.inf:
            raise RobucapError(f"toy_momentum decay must be a number >= 0, got {decay!r}")
        self.decay = float(decay)

    def perturb(self, objective: Objective, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Adversarial images after ``steps`` gradient evaluations.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H, W)``.
        """
        x = pixel_values
        x_adv, momentum = x.clone(), torch.zeros_like(x)
        step = self.epsilon / self.steps
        for _ in range(self.steps):
            grad, _ = input_gradient(objective, x_adv)
            norm = grad.abs().flatten(1).sum(1).clamp_min(_TINY).view(-1, *([1] * (x.dim() - 1)))
            momentum = self.decay * momentum + grad / norm
            x_adv = project_linf(x_adv - step * momentum.sign(), x, self.epsilon)
        return x_adv, self.steps
