"""Objectives that score a probability, so that several of them can be mixed (Liu et al. 2017's ensembles)."""

from __future__ import annotations

from abc import abstractmethod

import torch

from modules.attacks.protocol import Objective


class LikelihoodObjective(Objective):
    """An objective built on ``log P(goal | image)`` under one model: a caption's, a class label's.

    Targeted, the attack raises that probability (the goal is the target); untargeted, it lowers it (the goal is
    what the model says or should say on the clean image). An ensemble (:class:`~modules.victims.ensemble.
    EnsembleObjective`) mixes members' probabilities, not their losses.

    Attributes:
        targeted: The goal is a target to reach rather than an answer to move away from.
    """

    targeted: bool

    @abstractmethod
    def log_likelihood(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``log P(goal | image)`` per image, differentiable with respect to ``images``.

        Shape:
            ``images``: ``(R, C, H, W)``; ``rows``: ``(R,)``; returns ``(R,)``.
        """
