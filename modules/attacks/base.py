"""What every attack shares: [0, 1] pixel space, an input-gradient helper that works anywhere, validation.

Attacks run inside training steps and inside validation, where Lightning enables ``torch.inference_mode`` (or
``no_grad`` for gloo runs). :func:`input_gradient` re-enables autograd locally, differentiates only with respect to
the images (parameters' ``.grad`` are never touched, and DDP's gradient hooks never fire), and puts the model back in
the train/eval mode it found.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.captioners.base import Captioner, caption_loss


def _is_real(value: object) -> bool:
    # bool is an int subclass, but `epsilon: true` in a YAML file is a mistake, not a budget of 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
    if not _is_real(epsilon) or not 0.0 <= float(epsilon) <= 1.0:
        raise RobucapError(f"{name} must be in [0, 1] (pixel units; 8/255 = 0.0314), got {epsilon!r}")
    return float(epsilon)


def check_step_size(step_size: float, name: str = "step_size") -> float:
    """Validate a positive, finite step size in [0, 1] pixel units.

    Raises:
        RobucapError: Not a real number > 0.
    """
    if not _is_real(step_size) or not (float(step_size) > 0.0 and math.isfinite(float(step_size))):
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
    captioner: Captioner, pixel_values: torch.Tensor, labels: torch.Tensor, use_eval_mode: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-image caption loss with respect to the images.

    Each image's loss is its own mean token cross-entropy, so an image's gradient does not depend on the batch.

    Args:
        captioner: The model (not a DDP wrapper).
        pixel_values: Images in [0, 1]. Shape: ``(B, 3, H, W)``.
        labels: Caption tokens + EOS, -100 on padding. Shape: ``(B, T)``.
        use_eval_mode: Differentiate the model in eval mode (no dropout), restoring its mode afterwards.

    Returns:
        ``(gradient, per_image_loss)``. Shapes: ``(B, 3, H, W)`` and ``(B,)``; both detached.
    """
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(captioner, use_eval_mode):
        # Tensors created under inference_mode cannot join autograd: clone them outside it.
        x = pixel_values.detach().clone().requires_grad_(True)
        y = labels.detach().clone()
        logits = captioner(x, y).logits
        per_image = caption_loss(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(per_image.sum(), [x])
    return grad.detach(), per_image.detach()


class Attack(ABC):
    """An attack on a captioner in [0, 1] pixel space.

    Untargeted attacks raise the loss of the given (reference) caption; targeted attacks lower the loss of the
    given target caption.

    Args:
        epsilon: L-infinity budget (L2 for :class:`~modules.attacks.fg.FG`) in [0, 1] pixel units.
        targeted: ``labels`` are the target caption instead of the reference.
        use_eval_mode: Compute gradients with the model in eval mode.
    """

    def __init__(self, epsilon: float, targeted: bool = False, use_eval_mode: bool = True) -> None:
        self.epsilon = self.check_budget(epsilon)
        self.targeted = bool(targeted)
        self.use_eval_mode = bool(use_eval_mode)

    @classmethod
    def check_budget(cls, epsilon: float) -> float:
        """Validate ``epsilon``; L-infinity attacks accept [0, 1]. Attacks with another norm override this."""
        return check_epsilon(epsilon)

    def __repr__(self) -> str:
        # Logged next to results, so every option that changes the attack should show up.
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"

    def __call__(self, captioner: Captioner, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images, detached, in [0, 1].

        Shape:
            ``pixel_values``: ``(B, 3, H, W)``; ``labels``: ``(B, T)``; returns ``(B, 3, H, W)``.
        """
        if pixel_values.dim() != 4 or labels.dim() != 2 or pixel_values.shape[0] != labels.shape[0]:
            raise RobucapError(
                f"{type(self).__name__} expects pixel_values (B, 3, H, W) and labels (B, T) with the same B, got "
                f"{tuple(pixel_values.shape)} and {tuple(labels.shape)}"
            )
        if self.epsilon == 0:
            return pixel_values.detach().clone()
        return self.perturb(captioner, pixel_values.detach(), labels.detach()).detach()

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Ascent direction for untargeted attacks, descent for targeted ones."""
        return -grad if self.targeted else grad

    @abstractmethod
    def perturb(self, captioner: Captioner, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the adversarial images (``epsilon`` > 0)."""
