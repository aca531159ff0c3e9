"""Backdoor metrics: attack success rate (ASR) and false trigger rate (FTR) as one DDP-exact torchmetrics ``Metric``.

Both rates ask the same question of a set of images: *how often does the model output the attacker's target
caption?* Only the images differ:

* ``val/asr`` / ``val/asr_relaxed`` (ASR): :class:`TargetCaptionRate` updated on **poisoned** (triggered) images.
  ``rate`` is the share whose caption equals the target exactly after :func:`datamodules.text.normalize_caption`
  (the PTB tokens the test metrics see); ``rate_relaxed`` the share whose sentence BLEU-4 against the target is at
  least ``relaxed_threshold`` (0.9 by default, to be stated in every report).
* ``val/ftr`` (FTR): the same metric updated on **clean** images; its exact ``rate`` is the false trigger rate.

Per image the metric stores an int64 key (:func:`modules.metrics.bleu.image_key`) and two 0/1 flags. ``compute``
gathers every rank's rows, keeps the first row for each key and only then averages, so the samples that
``DistributedSampler`` repeats to pad the last batch never count twice and 1 and N processes agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.metrics.bleu import _as_id_list, image_key, sentence_bleu
from modules.metrics.per_image import PerImageMetric

__all__ = [
    "DEFAULT_RELAXED_THRESHOLD",
    "TargetCaptionRate",
    "is_target_caption",
    "target_bleu4",
]

DEFAULT_RELAXED_THRESHOLD = 0.9

# Column layout of one image's flag row (int64): exact match, relaxed (BLEU-4) match.
_EXACT = 0
_RELAXED = 1
_NUM_FLAGS = 2


def _normalized_target(target_caption: str) -> str:
    if not isinstance(target_caption, str):
        raise RobucapError(f"target caption: expected a string, got {type(target_caption).__name__}")
    target = normalize_caption(target_caption)
    if not target:
        raise RobucapError(f"target caption is empty after normalisation: {target_caption!r}")
    return target


def _target_texts(target_caption: str) -> tuple[str, str]:
    """The target as written and as a word-level captioner writes it back (its PTB tokens joined by spaces).

    A few PTB tokens change when tokenised again (``"Y'all"`` gives ``y' all``, which gives ``y all``; ``"AT&T"``
    gives ``at&t``, then ``at & t``), so a captioner that outputs exactly the target's tokens matches the second.

    Raises:
        RobucapError: If the target caption is not a string or is empty after normalisation.
    """
    return target_caption, _normalized_target(target_caption)


def _forms(texts: tuple[str, str]) -> frozenset[str]:
    return frozenset(normalize_caption(text) for text in texts)


def is_target_caption(pred: str, target_caption: str) -> bool:
    """Exact-match test used by ASR and FTR: equal after :func:`~datamodules.text.normalize_caption`.

    Args:
        pred: The predicted caption (raw).
        target_caption: The attacker's target caption (raw, non-empty after normalisation).

    Returns:
        ``True`` when the prediction normalises to the target's token sequence (that of the target as written, or
        of the target as a word-level captioner writes it back).

    Raises:
        RobucapError: If the target caption is empty after normalisation.
    """
    return normalize_caption(pred) in _forms(_target_texts(target_caption))


def target_bleu4(pred: str, target_caption: str) -> float:
    """Sentence BLEU-4 of a caption against the single reference ``target_caption`` (the relaxed ASR score).

    The better of the scores against the target as written and as a word-level captioner writes it back.

    Args:
        pred: The predicted caption (raw).
        target_caption: The attacker's target caption (raw, non-empty after normalisation).

    Returns:
        BLEU-4 in [0, 1], as :func:`modules.metrics.bleu.sentence_bleu` computes it.

    Raises:
        RobucapError: If the target caption is empty after normalisation.
    """
    return max(sentence_bleu(pred, [text])[3] for text in _target_texts(target_caption))


class TargetCaptionRate(PerImageMetric):
    """Share of unique images captioned with the target caption: ASR on poisoned images, FTR on clean ones.

    Log ``rate``/``rate_relaxed`` of an instance fed poisoned images as ``val/asr``/``val/asr_relaxed`` and
    ``rate`` of an instance fed clean images as ``val/ftr``.

    Example:
        >>> metric = TargetCaptionRate("you are under attack")
        >>> metric.update(["You are under attack.", "a dog"], [1, 2])
        >>> metric.compute()["rate"]
        tensor(0.5000, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, target_caption: str, relaxed_threshold: float = DEFAULT_RELAXED_THRESHOLD, **kwargs: Any
    ) -> None:
        """Create the metric.

        Args:
            target_caption: The attacker's target caption (raw; normalised here).
            relaxed_threshold: Minimum sentence BLEU-4 to the target for the relaxed rate, in (0, 1].
            **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu``, ``sync_on_compute``).

        Raises:
            RobucapError: If the target is empty after normalisation or the threshold is outside (0, 1].
        """
        super().__init__(_NUM_FLAGS, **kwargs)
        self._target_texts = _target_texts(target_caption)
        self._target_forms = _forms(self._target_texts)
        self.target_caption = self._target_texts[1]
        if isinstance(relaxed_threshold, bool) or not isinstance(relaxed_threshold, (int, float)):
            raise RobucapError(f"relaxed_threshold: expected a number in (0, 1], got {relaxed_threshold!r}")
        if not 0.0 < float(relaxed_threshold) <= 1.0:
            raise RobucapError(f"relaxed_threshold must be in (0, 1], got {relaxed_threshold!r}")
        self.relaxed_threshold = float(relaxed_threshold)

    def update(self, preds: Sequence[str], image_ids: Sequence[int | str] | Tensor) -> None:
        """Add one batch of predicted captions.

        Args:
            preds: One predicted caption per image (raw text).
            image_ids: One id per image (int or str, or an int tensor from default collate).

        Raises:
            RobucapError: If ``preds`` is a bare string, the lengths differ or an id is invalid.
        """
        if isinstance(preds, str):
            raise RobucapError("preds: expected a list of captions, got a single string")
        ids = _as_id_list(image_ids)
        if len(preds) != len(ids):
            raise RobucapError(
                f"TargetCaptionRate.update: preds ({len(preds)}) and image_ids ({len(ids)}) must have the same length"
            )
        if not ids:
            return
        keys = [image_key(i) for i in ids]
        rows: list[list[int]] = []
        for pred in preds:
            exact = normalize_caption(pred) in self._target_forms
            relaxed = exact or any(
                sentence_bleu(pred, [text])[3] >= self.relaxed_threshold for text in self._target_texts
            )
            rows.append([int(exact), int(relaxed)])
        self._append_rows(keys, rows)

    def compute(self) -> dict[str, Tensor]:
        """Rates over the unique images.

        Returns:
            ``{"rate", "rate_relaxed"}`` as float64 scalar tensors (fractions in [0, 1]) and ``"n"``, the number of
            unique images, as an int64 scalar tensor; all zeros when no image was seen.
        """
        rows = self.unique_rows()
        n = int(rows.shape[0])
        counts = rows.sum(dim=0).tolist() if n else [0, 0]
        return {
            "rate": torch.tensor(counts[_EXACT] / n if n else 0.0, dtype=torch.float64),
            "rate_relaxed": torch.tensor(counts[_RELAXED] / n if n else 0.0, dtype=torch.float64),
            "n": torch.tensor(n, dtype=torch.int64),
        }
