"""Fast Gradient (FG) method: one L2-normalised gradient step (Liu et al. 2017, section 2.2).

``x' = clip(x - eps * g / ||g||_2)`` with ``g`` the gradient of the image's objective (an untargeted caption
objective is the negative reference cross-entropy, so this is ``x + eps * grad CE / ||grad CE||_2``) and the norm
taken per image over all ``C * H * W`` values.

Unlike the L-infinity attacks, ``epsilon`` here is an **L2 budget** in [0, 1] pixel units: the perturbation of each
image has Euclidean norm at most ``epsilon`` (clipping to [0, 1] can only shrink it). Its root-mean-square per pixel
value is ``epsilon / sqrt(3 * H * W)``, so useful L2 budgets exceed 1 (an L2 of 1.0 on a 224 px image is an RMS
change of 0.0026, i.e. 0.66 / 255). FG therefore accepts any ``epsilon >= 0`` and, at attack time, rejects budgets
over ``sqrt(3 * H * W)``, the largest distance between two images in [0, 1], which almost always means epsilon was
given in 0-255 units or meant as an L-infinity budget.
"""

from __future__ import annotations

import math

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import BudgetAttack, is_real
from modules.attacks.protocol import Objective, input_gradient
from modules.attacks.registry import register_attack

# A zero gradient (e.g. a caption the model cannot see the image for) gives no direction: keep the image unchanged.
_TINY = 1e-12


@register_attack("fg", summary="one L2-normalised gradient step; epsilon is an L2 budget (Liu et al. 2017)")
class FG(BudgetAttack):
    """One L2-normalised gradient step per image.

    Args:
        epsilon: L2 budget per image in [0, 1] pixel units (see the module docstring for the scale).
        use_eval_mode: Compute the gradient with the model in eval mode (no dropout).

    Raises:
        RobucapError: ``epsilon`` negative or not a finite number; at attack time, ``epsilon`` larger than
            ``sqrt(3 * H * W)``.
    """

    @classmethod
    def check_budget(cls, epsilon: float) -> float:
        """Validate an L2 budget: any finite number >= 0 (the image-size bound is checked per batch)."""
        if not is_real(epsilon) or not (float(epsilon) >= 0.0 and math.isfinite(float(epsilon))):
            raise RobucapError(
                f"FG epsilon is an L2 budget and must be a number >= 0 (pixel units, per image), got {epsilon!r}"
            )
        return float(epsilon)

    def perturb(self, objective: Objective, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Adversarial images after one gradient evaluation.

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H, W)``.
        """
        x = pixel_values
        diameter = math.sqrt(x[0].numel())
        if self.epsilon > diameter:
            h, w = x.shape[-2:]
            raise RobucapError(
                f"FG epsilon {self.epsilon} (an L2 budget in [0, 1] pixel units) exceeds sqrt({x.shape[1]}*{h}*{w}) "
                f"= {diameter:.1f}, the largest distance between two {h}x{w} images; was it given in 0-255 units?"
            )
        grad, _ = input_gradient(objective, x)
        norm = grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (x.dim() - 1)))
        return (x - self.epsilon * grad / norm).clamp(0.0, 1.0), 1
