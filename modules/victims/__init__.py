"""Victims: the models attacks run on, each bringing its own objectives (:class:`~modules.attacks.protocol.Objective`).

An attack never knows what it attacks: it minimises ``objective.loss`` on images in [0, 1]. A captioner brings
:class:`~modules.victims.captioner.CaptionObjective` (caption cross-entropy, untargeted or targeted; Show-and-Fool's
log-probability and logits-margin losses, Chen et al. 2018) and :class:`~modules.victims.captioner.KeywordObjective`
(Show-and-Fool's keywords); several models combine into Liu et al. 2017's
:class:`~modules.victims.ensemble.EnsembleObjective` (eq. 6's mixture) or a
:class:`~modules.victims.ensemble.SumEnsembleObjective` that must hold on every member. Dense victims (Dense
Adversary Generation, Xie et al. 2017) bring a :class:`~modules.victims.dense.DenseObjective` each: a segmenter's pixels
(:class:`~modules.victims.segmenter.SegmenterObjective`), a detector's proposals
(:class:`~modules.victims.detector.DetectorObjective`), a captioner's content tokens
(:class:`~modules.victims.captioner_dense.TokenObjective`). A new kind of victim adds its own objective here, with
no change to any attack.
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
from modules.victims.captioner_dense import SHAPES_WORD_CLASSES, TokenObjective, word_classes
from modules.victims.dense import DenseObjective, adversarial_permutation, derangement
from modules.victims.detector import DetectorObjective, ProposalSettings
from modules.victims.ensemble import (
    ENSEMBLE_OBJECTIVES,
    EnsembleObjective,
    SumEnsembleObjective,
    ensemble_log_likelihood,
    ensemble_weights,
)
from modules.victims.segmenter import SegmenterObjective

__all__ = [
    "ENSEMBLE_OBJECTIVES",
    "LOSSES",
    "SHAPES_WORD_CLASSES",
    "CaptionObjective",
    "DenseObjective",
    "DetectorObjective",
    "EnsembleObjective",
    "KeywordObjective",
    "LikelihoodObjective",
    "ProposalSettings",
    "SegmenterObjective",
    "SumEnsembleObjective",
    "TokenObjective",
    "adversarial_permutation",
    "caption_ensemble",
    "caption_ids",
    "caption_labels",
    "check_token_ids",
    "derangement",
    "different_vocabularies",
    "ensemble_log_likelihood",
    "ensemble_weights",
    "greedy_ids",
    "sequence_nll",
    "word_classes",
]
