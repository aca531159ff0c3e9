"""What the budgeted gradient attacks share: validation, the L-infinity projection, random starts, the budget.

FGSM, PGD and FG (:class:`BudgetAttack` subclasses) take an ``epsilon`` in [0, 1] pixel units; a budget of 0 returns
the clean images unchanged without differentiating anything.
"""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod

import torch

from datamodules.errors import RobucapError
from modules.attacks.protocol import Attack, AttackResult, Objective


def is_real(value: object) -> bool:
    """A real number that is not a bool (``epsilon: true`` in a YAML file is a mistake, not a budget of 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(value: object, name: str) -> int:
    """Validate an integer option >= 1 (iterations, steps, rounds).

    Raises:
        RobucapError: Not an integer >= 1 (booleans included).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RobucapError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_positive(value: object, name: str) -> float:
    """Validate a finite number > 0 (learning rates, margins).

    Raises:
        RobucapError: Not a finite real number > 0.
    """
    if not is_real(value) or not (0 < float(value) < math.inf):  # type: ignore[arg-type]
        raise RobucapError(f"{name} must be a number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """Validate a budget in [0, 1] pixel units.

    Args:
        epsilon: The budget.
        name: The field name to print in the error message.

    Returns:
        ``epsilon`` as a Python float.

    Raises:
        RobucapError: Not a real number in [0, 1] (NaN and booleans included).
    """
    if not is_real(epsilon) or not 0.0 <= float(epsilon) <= 1.0:
        raise RobucapError(f"{name} must be in [0, 1] (pixel units; 8/255 = 0.0314), got {epsilon!r}")
    return float(epsilon)


def check_step_size(step_size: float, name: str = "step_size") -> float:
    """Validate a positive, finite step size in [0, 1] pixel units.

    Raises:
        RobucapError: Not a real number > 0.
    """
    if not is_real(step_size) or not (float(step_size) > 0.0 and math.isfinite(float(step_size))):
        raise RobucapError(f"{name} must be a number > 0 (pixel units; 2/255 = 0.0078), got {step_size!r}")
    return float(step_size)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Project onto the L-infinity ball of radius ``epsilon`` around ``x``, then onto the image range [0, 1].

    Both sets are boxes, so clamping to one and then the other is the exact projection onto their intersection.

    Shape:
        ``x_adv`` and ``x``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
    """
    return torch.clamp(x_adv, x - epsilon, x + epsilon).clamp(0.0, 1.0)


def uniform_start(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """A random point of the L-infinity ball around ``x`` (noise ~ U(-epsilon, epsilon)), clamped to [0, 1].

    Draws from the global generator of ``x``'s device, so ``torch.manual_seed`` makes it repeatable.

    Shape:
        ``x``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
    """
    noise = torch.empty_like(x).uniform_(-epsilon, epsilon)
    return (x + noise).clamp(0.0, 1.0)


class BudgetAttack(Attack):
    """An attack with a perturbation budget ``epsilon``; a budget of 0 returns the clean images unchanged.

    Args:
        epsilon: L-infinity budget (L2 for :class:`~modules.attacks.fg.FG`) in [0, 1] pixel units.
        use_eval_mode: Differentiate the victim in eval mode (no dropout).
    """

    def __init__(self, epsilon: float, use_eval_mode: bool = True) -> None:
        super().__init__(use_eval_mode=use_eval_mode)
        self.epsilon = self.check_budget(epsilon)

    @classmethod
    def check_budget(cls, epsilon: float) -> float:
        """Validate ``epsilon``; L-infinity attacks accept [0, 1]. Attacks with another norm override this."""
        return check_epsilon(epsilon)

    def run(self, objective: Objective, pixel_values: torch.Tensor) -> AttackResult:
        """The clean images for a zero budget, else :meth:`perturb`'s images judged by the objective.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1].
        """
        if self.epsilon == 0:
            return self.finish(objective, pixel_values, pixel_values.clone(), 0)
        adversarial, iterations = self.perturb(objective, pixel_values)
        return self.finish(objective, pixel_values, adversarial, iterations)

    @abstractmethod
    def perturb(self, objective: Objective, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The adversarial images (``epsilon`` > 0) and the gradient evaluations spent per image.

        Shape:
            ``pixel_values``: ``(B, C, H, W)``; returns ``(B, C, H, W)`` in [0, 1].
        """
