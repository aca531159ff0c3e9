"""Liu et al. 2017's ensemble objective (eq. 6): one perturbation against several models at once.

Liu et al. 2017 attack the mixture ``sum_i alpha_i P_i`` of k white-box models: targeted,
``-log(sum_i alpha_i P_i(goal | x'))``; non-targeted (the "counterpart derived similarly" of their eq. 3),
``log(sum_i alpha_i P_i(goal_i | x'))`` with each member's own goal (a captioner's own clean caption). The members are
:class:`~modules.victims.base.LikelihoodObjective` s of any victim, and the value is computed stably as a ``logsumexp``
over ``log alpha_i + log P_i``. Any attack runs on it: Liu et al.'s optimisation (:class:`~modules.attacks.
optimization.Optimization`), FG and FGS (:class:`~modules.attacks.fg.FG`, :class:`~modules.attacks.fgsm.FGSM`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.attacks.base import is_real
from modules.victims.base import LikelihoodObjective


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


class EnsembleObjective(LikelihoodObjective):
    """The members' probabilities mixed as in Liu et al. 2017, eq. 6 (lower is better for the attacker).

    Args:
        members: One likelihood objective per model, all targeted or all non-targeted, built for the same images.
        weights: Ensemble weights ``alpha_i`` (> 0), normalised to sum to 1; ``None``: equal weights.

    Raises:
        RobucapError: No members, a member that is not a likelihood objective, targeted and non-targeted members
            mixed, members built for different numbers of images, or bad weights.
    """

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
