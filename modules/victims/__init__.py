"""Victims: the models attacks run on, each bringing its own objectives (:class:`~modules.attacks.protocol.Objective`).

An attack never knows what it attacks: it minimises ``objective.loss`` on images in [0, 1]. A captioner brings
:class:`~modules.victims.captioner.CaptionObjective` (caption cross-entropy, untargeted or targeted; Show-and-Fool's
log-probability and logits-margin losses, Chen et al. 2018) and :class:`~modules.victims.captioner.KeywordObjective`
(Show-and-Fool's keywords); several models combine into Liu et al. 2017's
:class:`~modules.victims.ensemble.EnsembleObjective`. A new kind of victim (a detector, a segmenter) adds its own
objective here, with no change to any attack.
"""

from __future__ import annotations

from modules.victims.base import LikelihoodObjective
from modules.victims.captioner import (
    LOSSES,
    CaptionObjective,
    KeywordObjective,
    caption_ensemble,
    caption_ids,
    caption_labels,
    check_token_ids,
    different_vocabularies,
    greedy_ids,
    sequence_nll,
)
from modules.victims.ensemble import EnsembleObjective, ensemble_log_likelihood, ensemble_weights

__all__ = [
    "LOSSES",
    "CaptionObjective",
    "EnsembleObjective",
    "KeywordObjective",
    "LikelihoodObjective",
    "caption_ensemble",
    "caption_ids",
    "caption_labels",
    "check_token_ids",
    "different_vocabularies",
    "ensemble_log_likelihood",
    "ensemble_weights",
    "greedy_ids",
    "sequence_nll",
]
