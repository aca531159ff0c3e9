"""Liu et al. 2017's ensemble objective (eq. 6): one perturbation against several models at once.

Liu et al. 2017 attack the mixture ``sum_i alpha_i P_i`` of k white-box models: targeted,
``-log(sum_i alpha_i P_i(goal | x'))``; non-targeted (the "counterpart derived similarly" of their eq. 3),
``log(sum_i alpha_i P_i(goal_i | x'))`` with each member's own goal (a captioner's own clean caption). The members are
:class:`~modules.victims.base.LikelihoodObjective` s of any victim, and the value is computed stably as a ``logsumexp``
over ``log alpha_i + log P_i``. Any attack runs on it: Liu et al.'s optimisation (:class:`~modules.attacks.
optimization.Optimization`), FG and FGS (:class:`~modules.attacks.fg.FG`, :class:`~modules.attacks.fgsm.FGSM`).

Eq. 6's mixture is low as soon as ONE member gives the goal a high probability, so a targeted attack on it stops
pulling once the easiest member is fooled (the transfer study at 100 iterations: 6-7 % of images fooled every member;
see docs/attacks.md, "Targeted ensembles"). The objectives of :class:`SumEnsembleObjective` hold only when every
member holds (``ENSEMBLE_OBJECTIVES``, ``objective`` option):

* ``mixture``: eq. 6 (:class:`EnsembleObjective`).
* ``sum_loglik``: ``sum_i w_i (-log P_i(goal | x'))`` targeted (``+log P_i`` non-targeted): the members' log-likelihood
  losses (per-token log-probabilities summed over the caption) added up, i.e. ``-log prod_i P_i^{w_i}``; no member's
  term can be traded away by another's.
* ``sum_margin``: ``sum_i w_i margin_i(x')`` with each member's margin loss (Show-and-Fool eq. 7 / Carlini & Wagner:
  ``sum_t max(-kappa, max_{k != S_t} z_t^k - z_t^{S_t})``), targeted only. A member whose every margin is below
  ``-kappa`` sits at its floor and gives no gradient: fooled members stop pulling and the rest get the whole step.

``w_i = K alpha_i`` (``K`` members): with equal weights every member counts once and the sums are plain sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.attacks.base import is_real
from modules.victims.base import LikelihoodObjective

EnsembleObjectiveName = Literal["mixture", "sum_loglik", "sum_margin"]
"""How an ensemble combines its members (module docstring)."""

ENSEMBLE_OBJECTIVES: tuple[str, ...] = get_args(EnsembleObjectiveName)
"""The names :func:`check_ensemble_objective` accepts, eq. 6's mixture first."""


def ensemble_log_likelihood(log_likelihoods: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log(sum_i alpha_i P_i)`` per image, computed with ``logsumexp``.

    Args:
        log_likelihoods: ``log P_i`` of each member. Shape: ``(K, B)``.
        weights: Ensemble weights ``alpha_i`` (> 0, summing to 1). Shape: ``(K,)``.

    Returns:
        The log-probability under the ensemble. Shape: ``(B,)``.
    """
    log_weights = weights.to(device=log_likelihoods.device, dtype=log_likelihoods.dtype).log()
    return torch.logsumexp(log_weights.unsqueeze(1) + log_likelihoods, dim=0)


def ensemble_weights(weights: Sequence[float] | None, k: int) -> torch.Tensor:
    """Weights normalised to sum to 1; ``None``: equal weights.

    Raises:
        RobucapError: Not one weight per member, or a weight that is not a number > 0.

    Shape:
        returns ``(k,)`` float64.
    """
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    values = list(weights)
    if len(values) != k:
        raise RobucapError(f"ensemble weights: expected one weight per member ({k}), got {len(values)}")
    if not all(is_real(w) and 0 < float(w) < math.inf for w in values):
        raise RobucapError(f"ensemble weights must all be numbers > 0, got {values!r}")
    total = sum(float(w) for w in values)
    return torch.tensor([float(w) / total for w in values], dtype=torch.float64)


def check_ensemble_objective(name: object, option: str = "ensemble objective") -> str:
    """``name`` if it is one of :data:`ENSEMBLE_OBJECTIVES`.

    Args:
        name: The value given.
        option: How the error names the option (``--objective``, ``transfer study ensemble_objective``).

    Raises:
        RobucapError: Not one of the names.
    """
    if not isinstance(name, str) or name not in ENSEMBLE_OBJECTIVES:
        raise RobucapError(f"{option} must be one of {', '.join(ENSEMBLE_OBJECTIVES)}, got {name!r}")
    return name


class EnsembleObjective(LikelihoodObjective):
    """The members' probabilities mixed as in Liu et al. 2017, eq. 6 (lower is better for the attacker).

    Args:
        members: One likelihood objective per model, all targeted or all non-targeted, built for the same images.
        weights: Ensemble weights ``alpha_i`` (> 0), normalised to sum to 1; ``None``: equal weights.

    Raises:
        RobucapError: No members, a member that is not a likelihood objective, targeted and non-targeted members
            mixed, members built for different numbers of images, or bad weights.

    Attributes:
        objective: ``mixture`` (eq. 6); the sums of :class:`SumEnsembleObjective` name themselves.
    """

    objective: str = "mixture"

    def __init__(self, members: Sequence[LikelihoodObjective], weights: Sequence[float] | None = None) -> None:
        self.members = list(members)
        if not self.members:
            raise RobucapError("an ensemble objective needs at least one member, got none")
        for i, member in enumerate(self.members):
            if not isinstance(member, LikelihoodObjective):
                raise RobucapError(
                    f"ensemble member {i} must be a likelihood objective (it mixes probabilities), got "
                    f"{type(member).__name__}"
                )
        if len({m.targeted for m in self.members}) > 1:
            raise RobucapError("ensemble members must be all targeted or all non-targeted")
        sizes = {m.size for m in self.members if m.size is not None}
        if len(sizes) > 1:
            raise RobucapError(f"ensemble members were built for different numbers of images: {sorted(sizes)}")
        self.weights = ensemble_weights(weights, len(self.members))
        self.targeted = self.members[0].targeted
        self.size = next(iter(sizes)) if sizes else None
        self.moving_target = any(m.moving_target for m in self.members)
        # One module to switch to eval mode; ModuleList only groups them (a model listed twice is switched once).
        self.module = nn.ModuleList([m.module for m in self.members])

    def member_log_likelihoods(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``log P_i(goal_i | x')`` of every member (differentiable in ``images``).

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(K, R)``.
        """
        return torch.stack([m.log_likelihood(images, rows) for m in self.members])

    def log_likelihood(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``log(sum_i alpha_i P_i(goal_i | x'))`` per image. Shape: ``(R,)``."""
        return ensemble_log_likelihood(self.member_log_likelihoods(images, rows), self.weights)

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 6: ``-log(sum_i alpha_i P_i)`` targeted, ``log(sum_i alpha_i P_i)`` non-targeted. Shape: ``(R,)``."""
        log_p = self.log_likelihood(images, rows)
        return -log_p if self.targeted else log_p

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Every member reaches its goal; ``None`` if a member defines no success. Shape: ``(R,)`` bool."""
        verdicts = []
        for member in self.members:
            verdict = member.success(images, rows)
            if verdict is None:
                return None
            verdicts.append(verdict.cpu().bool())
        return torch.stack(verdicts).all(0)

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Refresh every member; success where every member found it out. Shape: ``(R,)`` bool or ``None``."""
        verdicts = [member.refresh(images, rows) for member in self.members]
        if any(v is None for v in verdicts):
            return None
        return torch.stack([v.cpu().bool() for v in verdicts if v is not None]).all(0)


class SumEnsembleObjective(EnsembleObjective):
    """The members' own losses added up, so that the objective is low only when EVERY member reaches its goal.

    ``sum_loglik``: ``sum_i w_i (-log P_i(goal_i | x'))`` targeted, ``sum_i w_i log P_i`` non-targeted (any likelihood
    objective). ``sum_margin``: ``sum_i w_i loss_i(x')`` with members whose loss is a margin loss floored at
    ``-kappa`` (a :class:`~modules.victims.captioner.CaptionObjective` with ``loss="logits"``, a keyword objective),
    so a member fooled by ``kappa`` gives no gradient. ``w_i = K alpha_i``: equal weights give the plain sum.
    Success (inherited) is every member's success.

    Args:
        members: One likelihood objective per model, built for the same images.
        weights: Ensemble weights ``alpha_i`` (> 0), normalised to sum to 1; ``None``: equal weights.
        objective: ``sum_loglik`` or ``sum_margin``.

    Raises:
        RobucapError: What :class:`EnsembleObjective` rejects; an objective that is not a sum; ``sum_margin`` with
            non-targeted members or a member whose loss is not a margin loss.
    """

    def __init__(
        self,
        members: Sequence[LikelihoodObjective],
        weights: Sequence[float] | None = None,
        objective: str = "sum_loglik",
    ) -> None:
        super().__init__(members, weights)
        sums = ENSEMBLE_OBJECTIVES[1:]
        if objective not in sums:
            raise RobucapError(f"a summed ensemble objective must be one of {', '.join(sums)}, got {objective!r}")
        self.objective = objective
        if objective == "sum_margin":
            if not self.targeted:
                raise RobucapError(
                    "the sum_margin ensemble objective is targeted only (a margin towards a goal); use mixture or "
                    "sum_loglik for a non-targeted ensemble"
                )
            for i, member in enumerate(self.members):
                # Duck-typed: a margin loss is a property of the member's loss, which any victim may offer.
                if not getattr(member, "margin_loss", False):
                    raise RobucapError(
                        f"sum_margin: ensemble member {i} ({type(member).__name__}) has no margin loss; build it with "
                        "loss='logits'"
                    )
        self.member_weights = self.weights * len(self.members)

    def member_losses(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Each member's term of the sum (before weighting), differentiable in ``images``.

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(K, R)``.
        """
        if self.objective == "sum_margin":
            return torch.stack([m.loss(images, rows) for m in self.members])
        log_p = self.member_log_likelihoods(images, rows)
        return -log_p if self.targeted else log_p

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i w_i term_i``. Shape: ``(R,)``."""
        terms = self.member_losses(images, rows)
        weights = self.member_weights.to(device=terms.device, dtype=terms.dtype)
        return (weights.unsqueeze(1) * terms).sum(0)

    def loss_and_success(
        self, images: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sum_margin``: the sum and every member's teacher-forced check from the same forward passes (``None``
        if a member has no check); ``sum_loglik``: the loss and no check. Shapes: ``(R,)``."""
        if self.objective != "sum_margin":
            return self.loss(images, rows), None
        pairs = [m.loss_and_success(images, rows) for m in self.members]
        terms = torch.stack([loss for loss, _ in pairs])
        weights = self.member_weights.to(device=terms.device, dtype=terms.dtype)
        checks = [check.cpu().bool() for _, check in pairs if check is not None]
        checked = torch.stack(checks).all(0) if len(checks) == len(pairs) else None
        return (weights.unsqueeze(1) * terms).sum(0), checked
