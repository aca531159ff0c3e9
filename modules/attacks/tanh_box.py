"""The tanh change of variables and a per-image Adam, shared by the optimisation attacks (Show-and-Fool, ensemble).

Carlini & Wagner's box trick (Show-and-Fool, Chen et al. 2018, eq. 2): optimise an unconstrained ``w`` and look at the
image ``(tanh(y + w) + 1) / 2`` with ``y = arctanh(2x - 1)``, so every iterate lies in [0, 1] without clipping.
Show-and-Fool (Chen et al. 2018) works on [-1, 1] images; robucap keeps [0, 1] pixels, so the map carries the affine
``(. + 1) / 2``.

:class:`RowAdam` is ``torch.optim.Adam`` (same update, same defaults) with its state kept per image row, so images
can leave a batch (early stop) without disturbing the others: an image's trajectory does not depend on which other
images share its batch. Its learning rate may differ per row (Show-and-Fool raises the step size of the images a
round failed on).

Values at the box's edge: a pure black or white value starts at ``|y| = 7.25`` (the shrink below moves it by 5e-7),
where ``tanh'`` is 2e-6. Adam divides by the gradient's running RMS, so its ``w`` still moves by about ``lr`` per
step (unless the gradient falls below eps = 1e-8), but the pixel itself only moves once ``|y + w|`` is down to about
3, some 850 steps at lr 0.005. On the shapes data this is not what limits Show-and-Fool: of the demo baseline's 50
attacked test images, 0.0015 % of the values are exactly 0 or 1 and 0.05 % lie within 0.02 of either bound, and the
failures' final iterates have 0.01 % of their values at ``|y + w| > 4`` (measured; docs/attacks.md).
"""

from __future__ import annotations

import torch

# arctanh(+-1) is infinite: pull the image a hair inside the box first (Carlini & Wagner use the same factor).
_SHRINK = 1.0 - 1e-6


def to_tanh_space(pixel_values: torch.Tensor) -> torch.Tensor:
    """``y = arctanh(2x - 1)``, slightly shrunk so that pure black and white pixels stay finite.

    Shape:
        ``(B, 3, H, W)`` in [0, 1] in; same shape out.
    """
    return torch.atanh((2.0 * pixel_values - 1.0) * _SHRINK)


def from_tanh_space(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The image ``(tanh(y + w) + 1) / 2``, in [0, 1] for any ``w``.

    Shape:
        ``y`` and ``w``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
    """
    return (torch.tanh(y + w) + 1.0) / 2.0


class RowAdam:
    """Adam on a batch of independent variables, one per row, with rows that can be dropped.

    Same update as ``torch.optim.Adam`` (``amsgrad=False``, no weight decay): ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g^2``, ``w -= lr * m_hat / (sqrt(v_hat) + eps)``. Every row starts together, so one
    step counter serves all rows. With one learning rate per row, each row follows ``torch.optim.Adam`` at its own
    rate.

    Args:
        params: The variables, one row per image. Shape: ``(B, ...)``.
        lr: Learning rate: one for every row, or one per row. Shape: scalar or ``(B,)``.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
    """

    def __init__(
        self,
        params: torch.Tensor,
        lr: float | torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.betas, self.eps = betas, float(eps)
        # Per-row rates as a (B, 1, ..., 1) column that broadcasts over each row's values.
        self.lr: float | torch.Tensor = (
            lr.to(device=params.device, dtype=params.dtype).reshape(-1, *([1] * (params.dim() - 1)))
            if isinstance(lr, torch.Tensor)
            else float(lr)
        )
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params)
        self.steps = 0

    def step(self, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """Update the rows ``rows`` of the parameters in place with their gradient ``grad``.

        Shape:
            ``grad``: ``(len(rows), ...)``; ``rows``: ``(R,)`` long indices.
        """
        self.steps += 1
        beta1, beta2 = self.betas
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        bias1 = 1.0 - beta1**self.steps
        bias2 = 1.0 - beta2**self.steps
        denom = (v.sqrt() / bias2**0.5).add_(self.eps)
        lr = self.lr[rows] if isinstance(self.lr, torch.Tensor) else self.lr
        self.params[rows] -= (lr / bias1) * m / denom
