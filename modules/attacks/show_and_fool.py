"""Show-and-Fool (Chen et al. 2018): the optimisation with a per-image ``c`` search and abort-early.

Each image gets its own perturbation, found by minimising ``c * loss(x') + ||x' - x||_2^2`` over a tanh-space
variable (:mod:`modules.attacks.tanh_box`) with Adam (lr 0.005, 1000 iterations), for a per-image ``c`` searched
as in the paper: start at 1, multiply by 10 until the attack succeeds, then bisect between the largest failing and
the smallest succeeding ``c`` (5 rounds in all). Each round restarts from the clean image; the result is the
successful image of smallest distortion over all rounds.

The search also raises the step size of an image that has not succeeded yet: each round that fails multiplies its
Adam learning rate by ``lr_growth`` (default 3: 0.005, 0.015, 0.045, 0.135, 0.405), and bisection keeps the rate
of the first success. Raising ``c`` alone cannot rescue such an image: Adam's update is invariant to the scale of
the objective, so once ``c * loss`` dominates the distortion, the rounds at c = 100, 1000 and 10000 retrace the same
path to the same stall. Measured on the demo baseline (docs/attacks.md), the 9 of 50 targets that failed at the
paper's fixed lr 0.005 stalled 0.004 to 5 logits short at c = 1000 as at c = 10, and all 9 succeeded in one round at
c = 1000 with lr 0.1. ``lr_growth=1`` is the paper's search.

The loss and the goal come from the objective: Show-and-Fool's targeted-caption losses (eq. 7 on the logits, eq. 5
on the log-probability) and its keyword loss (eq. 9, whose decoder input is the model's own caption of ``x'``,
re-inferred every ``reinfer_every`` iterations through ``objective.refresh``) are captioner objectives
(:mod:`modules.victims.captioner`). An iterate counts as a success when the objective says so from the same forward
pass (``loss_and_success``, the teacher-forced check) or from a refresh; the returned image's success is confirmed
by ``objective.success`` (for a captioner: on its generated caption).

Distortion is measured in robucap's [0, 1] pixel units (Show-and-Fool's [-1, 1] images give twice the L2 norm).

Batching: all images of a batch are optimised together, each with its own ``c``, Adam state and bounds. An image
leaves the batch once its objective has stopped improving (Carlini & Wagner's abort-early rule: less than 0.01 %
lower than ``iterations / 10`` iterations before; for an objective that moves on refresh only after its first success
of the round), so late iterations only pay for the images still moving. An image's result does not depend on the
other images of its batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from datamodules.errors import RobucapError
from modules.attacks.base import check_count, check_positive
from modules.attacks.protocol import Attack, AttackResult, Objective
from modules.attacks.registry import register_attack
from modules.attacks.tanh_box import RowAdam, from_tanh_space, to_tanh_space

_NO_C = math.inf  # "no bound yet" for the c search, as in Carlini & Wagner's 1e10


@dataclass(kw_only=True)
class ShowAndFoolResult(AttackResult):
    """What a Show-and-Fool run found, per image.

    ``adversarial`` is the successful image of smallest distortion, or for a failure the last iterate of the round
    with the largest ``c`` tried (what Show-and-Fool's failure statistics describe); ``success`` is the objective's
    verdict on it; ``iterations`` the Adam iterations spent over all rounds.

    Attributes:
        c: The ``c`` of the returned image. Shape: ``(B,)``.
        lr: The Adam learning rate of the round that gave the returned image. Shape: ``(B,)``.
        rounds: Rounds of the ``c`` search run (the same for every image of the batch).
    """

    c: torch.Tensor
    lr: torch.Tensor
    rounds: int


@dataclass
class _Best:
    """The search's per-image state over rounds (CPU tensors, ``x``'s device for the images)."""

    images: torch.Tensor
    l2: torch.Tensor
    c: torch.Tensor
    lr: torch.Tensor


@register_attack("show_and_fool", summary="targeted optimisation with a per-image c search (Chen et al. 2018)")
class ShowAndFool(Attack):
    """Show-and-Fool's targeted optimisation, batched with a per-image ``c``.

    Args:
        iterations: Adam iterations per round of the ``c`` search.
        lr: Adam learning rate.
        initial_c: First ``c``.
        lr_growth: Factor on an image's learning rate after each round with no success so far (1: the paper's
            fixed rate).
        search_rounds: Rounds of the ``c`` search (1 = a single run at ``initial_c``).
        reinfer_every: Call ``objective.refresh`` every this many iterations (paper: T = 5 for keywords).
        abort_early: Drop an image from its round once its objective stops improving.
        use_eval_mode: Differentiate the model in eval mode (no dropout), restoring its mode afterwards.

    Raises:
        RobucapError: ``iterations``/``search_rounds``/``reinfer_every`` < 1, ``lr``/``initial_c`` not > 0, or
            ``lr_growth`` < 1; at attack time, an objective without a success criterion.

    Example:
        >>> objective = CaptionObjective.targeting(captioner, [target_caption_ids(tokenizer, "a red circle")] * b)
        >>> result = ShowAndFool()(objective, images)  # doctest: +SKIP
    """

    def __init__(
        self,
        iterations: int = 1000,
        lr: float = 0.005,
        initial_c: float = 1.0,
        search_rounds: int = 5,
        reinfer_every: int = 5,
        abort_early: bool = True,
        use_eval_mode: bool = True,
        lr_growth: float = 3.0,
    ) -> None:
        super().__init__(use_eval_mode=use_eval_mode)
        self.iterations = check_count(iterations, "Show-and-Fool iterations")
        self.search_rounds = check_count(search_rounds, "Show-and-Fool search_rounds")
        self.reinfer_every = check_count(reinfer_every, "Show-and-Fool reinfer_every")
        self.lr = check_positive(lr, "Show-and-Fool lr")
        self.initial_c = check_positive(initial_c, "Show-and-Fool c (initial_c)")
        self.abort_early = bool(abort_early)
        if not (isinstance(lr_growth, numbers.Real) and math.isfinite(lr_growth) and lr_growth >= 1):
            raise RobucapError(f"Show-and-Fool lr_growth must be a number >= 1, got {lr_growth!r}")
        self.lr_growth = float(lr_growth)

    def run(self, objective: Objective, pixel_values: torch.Tensor) -> ShowAndFoolResult:
        """Attack a batch of images, each towards its own goal (held by the objective).

        Shape:
            ``pixel_values``: ``(B, C, H, W)`` in [0, 1].
        """
        with torch.inference_mode(False):
            # Tensors created under inference_mode cannot join autograd: clone them outside it.
            x = pixel_values.clone()
            return self._search(objective, x)

    def _search(self, objective: Objective, x: torch.Tensor) -> ShowAndFoolResult:
        b = x.shape[0]
        y = to_tanh_space(x)
        c = torch.full((b,), self.initial_c, dtype=torch.float64)
        lr = torch.full((b,), self.lr, dtype=torch.float64)
        lower = torch.zeros(b, dtype=torch.float64)
        upper = torch.full((b,), _NO_C, dtype=torch.float64)
        nan = torch.full((b,), math.nan, dtype=torch.float64)
        best = _Best(x.clone(), torch.full((b,), math.inf), nan.clone(), nan.clone())
        fallback, fallback_c, fallback_lr = x.clone(), torch.full((b,), -math.inf, dtype=torch.float64), nan.clone()
        spent = torch.zeros(b, dtype=torch.long)

        for _ in range(self.search_rounds):
            found, last, used = self._round(objective, x, y, c, lr, best)
            spent += used
            success = found < math.inf
            # The failure example comes from the largest c tried: the paper's failure statistics describe it.
            larger = c >= fallback_c
            fallback[larger] = last[larger]
            fallback_c = torch.where(larger, c, fallback_c)
            fallback_lr = torch.where(larger, lr, fallback_lr)
            # Show-and-Fool / Carlini & Wagner: x10 until the first success, then bisect.
            upper = torch.where(success, torch.minimum(upper, c), upper)
            lower = torch.where(success, lower, torch.maximum(lower, c))
            c = torch.where(upper < _NO_C, (lower + upper) / 2, c * 10)
            # No success yet: a larger c alone retraces the same Adam path (scale invariance), so take larger steps.
            lr = torch.where(upper < _NO_C, lr, lr * self.lr_growth)

        won = best.l2.isfinite()
        adversarial = torch.where(won.view(-1, 1, 1, 1), best.images, fallback)
        with torch.no_grad():
            # Success is judged on the returned image by the objective (a generated caption), not on the cheap check.
            confirmed = objective.success(adversarial)
        if confirmed is None:
            raise RobucapError(
                f"Show-and-Fool needs an objective that defines success; {type(objective).__name__} defines none"
            )
        result = AttackResult.measure(x, adversarial, spent, confirmed.cpu())
        return ShowAndFoolResult(
            **vars(result),
            c=torch.where(won, best.c, fallback_c).float(),
            lr=torch.where(won, best.lr, fallback_lr).float(),
            rounds=self.search_rounds,
        )

    def _round(
        self, objective: Objective, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, lr: torch.Tensor, best: _Best
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round of the ``c`` search from the clean images, each image at its own ``c`` and learning rate.

        Updates ``best`` in place where a success beats the image's best L2 so far.

        Returns:
            ``(found_l2, last, iterations)``: per image the smallest L2 of a success in this round (inf if none),
            the last iterate, and the iterations run. Shapes: ``(B,)``, ``(B, C, H, W)``, ``(B,)``.
        """
        b, device = x.shape[0], x.device
        w = torch.zeros_like(x)
        adam = RowAdam(w, lr)
        active = torch.arange(b, device=device)
        found = torch.full((b,), math.inf)
        used = torch.zeros(b, dtype=torch.long)
        check_every = max(1, self.iterations // 10)
        previous = torch.full((b,), math.inf, dtype=torch.float64)
        c_dev = c.to(device=device, dtype=torch.float32)

        for it in range(self.iterations):
            if active.numel() == 0:
                break
            rows = active.cpu()
            w_a = w[active].requires_grad_(True)
            with torch.enable_grad():
                x_adv = from_tanh_space(y[active], w_a)
                refreshed = None
                if it % self.reinfer_every == 0:
                    with torch.no_grad():
                        refreshed = objective.refresh(x_adv.detach(), active)
                loss, checked = objective.loss_and_success(x_adv, active)
                distortion = (x_adv - x[active]).flatten(1).pow(2).sum(1)
                value = c_dev[active] * loss + distortion
                (grad,) = torch.autograd.grad(value.sum(), [w_a])
            success_now = _either(checked, refreshed, rows.numel())

            # Record successes of the current iterate (before the step), smallest distortion first.
            l2 = distortion.detach().sqrt().cpu()
            better = success_now & (l2 < found[rows]) & (l2 < best.l2[rows])
            found[rows] = torch.where(success_now, torch.minimum(found[rows], l2), found[rows])
            if better.any():
                keep = rows[better]
                best.images[keep.to(device)] = x_adv.detach()[better.to(device)]
                best.l2[keep] = l2[better]
                best.c[keep] = c[keep]
                best.lr[keep] = lr[keep]
            adam.step(grad.detach(), active)
            used[rows] += 1

            if self.abort_early and (it + 1) % check_every == 0:
                current = value.detach().double().cpu()
                stalled = current > previous[rows] - 1e-4 * previous[rows].abs()
                if objective.moving_target:
                    # The objective jumps whenever it is refreshed, so a stall before the first success says
                    # nothing: such images only stop once they have succeeded in this round.
                    stalled &= found[rows] < math.inf
                previous[rows] = current
                active = active[~stalled.to(device)]

        last = from_tanh_space(y, w.detach())
        return found, last, used


def _either(checked: torch.Tensor | None, refreshed: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per image, whether either check saw a success (no check: no success). Shape: ``(n,)`` bool on the CPU."""
    out = torch.zeros(n, dtype=torch.bool)
    for verdict in (checked, refreshed):
        if verdict is not None:
            out |= verdict.detach().cpu().bool()
    return out
