"""Corpus BLEU-1..4 as a torchmetrics ``Metric`` that is exact under DDP.

The numbers equal pycocoevalcap's ``Bleu(4).compute_score`` (reference-length option ``"closest"``, the same
smoothing constants, float64) on captions tokenised as the test metrics tokenise them: PTB tokens from
:func:`datamodules.text.normalize_caption` (which reproduces pycocoevalcap's PTB tokenizer and punctuation filter),
split on whitespace as pycocoevalcap's ``BleuScorer`` splits them. So the BLEU that picks the checkpoint is the BLEU it
is tested on.

Exactness under DDP comes from keeping *per-image sufficient statistics* (clipped n-gram matches, n-gram totals,
hypothesis length, closest reference length) keyed by a process-independent 64-bit image key. ``compute`` gathers
them from every rank, keeps one row per image and only then sums, so the samples that ``DistributedSampler``
repeats to pad the last batch never count twice and 1 and N processes give identical numbers.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.metrics.per_image import PerImageMetric

__all__ = ["BLEU_KEYS", "CaptionBLEU", "bleu_statistics", "image_key", "sentence_bleu"]

MAX_N = 4
BLEU_KEYS: tuple[str, ...] = tuple(f"bleu{n}" for n in range(1, MAX_N + 1))

# Column layout of one image's statistics row (int64):
# [0, 4) clipped n-gram matches for n = 1..4, [4, 8) hypothesis n-gram counts, 8 hypothesis length,
# 9 closest reference length.
_MATCH = slice(0, MAX_N)
_TOTAL = slice(MAX_N, 2 * MAX_N)
_HYP_LEN = 2 * MAX_N
_REF_LEN = 2 * MAX_N + 1
NUM_STATS = 2 * MAX_N + 2

# pycocoevalcap's BleuScorer constants: keep them bit-identical so our numbers match to float64 rounding.
_TINY = 1e-15
_SMALL = 1e-9

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def image_key(image_id: int | str | Any) -> int:
    """Map an image id to an int64 key that is the same in every process and every run.

    Integers that fit in int64 are their own key; strings (and larger integers) are hashed with BLAKE2b to 63
    bits. Python's ``hash`` is salted per process and therefore unusable across DDP ranks.

    Args:
        image_id: ``int`` (including numpy integers and one-element integer tensors) or ``str``.

    Returns:
        The int64 key.

    Raises:
        RobucapError: If the id is neither an integer nor a string.
    """
    if isinstance(image_id, Tensor):
        if image_id.numel() != 1 or image_id.is_floating_point() or image_id.is_complex():
            raise RobucapError(f"image_id: expected an int or str, got a tensor of shape {tuple(image_id.shape)}")
        image_id = image_id.item()
    if isinstance(image_id, str):
        text = image_id
    else:
        try:
            value = operator.index(image_id)
        except TypeError:
            kind = type(image_id).__name__
            raise RobucapError(f"image_id: expected an int or str, got {kind} {image_id!r}") from None
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        text = str(value)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _bleu_words(text: str) -> list[str]:
    """The words BLEU counts: the PTB tokens, split on whitespace like ``BleuScorer`` does.

    The split matters for the few PTB tokens that hold a no-break space (``"2 1/2"`` becomes one token ``"2\\xa01/2"``;
    pycocoevalcap's ``str.split`` counts it as two words).
    """
    return normalize_caption(text).split()


def _ngram_counts(tokens: Sequence[str], n_max: int = MAX_N) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def bleu_statistics(pred: str, references: Sequence[str]) -> list[int]:
    """BLEU sufficient statistics of one caption against all references of its image.

    Args:
        pred: The predicted caption (raw; tokenised here like the test metrics do).
        references: All reference captions of the image (raw), at least one.

    Returns:
        ``NUM_STATS`` integers: clipped n-gram matches for n = 1..4, hypothesis n-gram counts for n = 1..4, the
        hypothesis length and the closest reference length (ties go to the shorter reference, as pycocoevalcap's
        option ``"closest"``).

    Raises:
        RobucapError: If ``references`` is empty or a bare string.
    """
    if isinstance(references, str) or len(references) == 0:
        raise RobucapError("references: expected a non-empty list of reference captions for each image")
    hyp = _bleu_words(pred)
    hyp_counts = _ngram_counts(hyp)
    max_ref_counts: dict[tuple[str, ...], int] = {}
    ref_lens: list[int] = []
    for ref in references:
        ref_tokens = _bleu_words(ref)
        ref_lens.append(len(ref_tokens))
        for ngram, count in _ngram_counts(ref_tokens).items():
            if count > max_ref_counts.get(ngram, 0):
                max_ref_counts[ngram] = count
    matches = [0] * MAX_N
    for ngram, count in hyp_counts.items():
        matches[len(ngram) - 1] += min(count, max_ref_counts.get(ngram, 0))
    hyp_len = len(hyp)
    totals = [max(0, hyp_len - n + 1) for n in range(1, MAX_N + 1)]
    # (distance, length) ordering resolves ties to the shorter reference, exactly like BleuScorer.
    closest = min((abs(length - hyp_len), length) for length in ref_lens)[1]
    return [*matches, *totals, hyp_len, closest]


def _bleu_from_stats(stats: Sequence[int | float]) -> list[float]:
    """BLEU-1..4 from (summed) statistics with BleuScorer's smoothing and brevity penalty, in float64."""
    matches, totals = stats[_MATCH], stats[_TOTAL]
    scores: list[float] = []
    product = 1.0
    for k in range(MAX_N):
        product *= float(matches[k] + _TINY) / (totals[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (stats[_HYP_LEN] + _TINY) / (stats[_REF_LEN] + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [score * penalty for score in scores]
    return scores


def sentence_bleu(pred: str, references: Sequence[str]) -> list[float]:
    """Per-caption BLEU-1..4, equal to the per-image scores pycocoevalcap's ``Bleu(4)`` returns.

    Useful for thresholded tests such as a relaxed attack success rate (BLEU-4 to a target caption).

    Args:
        pred: The predicted caption (raw).
        references: The reference captions (raw), at least one.

    Returns:
        ``[bleu1, bleu2, bleu3, bleu4]`` as fractions in [0, 1].
    """
    return _bleu_from_stats(bleu_statistics(pred, references))


def _as_id_list(image_ids: Sequence[int | str] | Tensor) -> list[Any]:
    # Default collate turns a list of int ids into a tensor; accept both forms.
    if isinstance(image_ids, Tensor):
        return image_ids.reshape(-1).tolist()
    if isinstance(image_ids, str):
        raise RobucapError("image_ids: expected one id per caption, got a single string")
    return list(image_ids)


class CaptionBLEU(PerImageMetric):
    """Corpus BLEU-1..4 over unique images, identical to pycocoevalcap's ``Bleu(4)`` and exact under DDP.

    Every call to :meth:`update` stores one row of integer statistics per image; :meth:`compute` gathers the
    rows of all processes, keeps the first row for each image key (padding duplicates added by
    ``DistributedSampler`` are identical) and evaluates BLEU on their sum.

    Example:
        >>> metric = CaptionBLEU()
        >>> metric.update(["a dog runs"], [["A dog runs.", "a dog is running"]], [42])
        >>> metric.compute()["bleu1"]
        tensor(1., dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        """Create the metric.

        Args:
            **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu``, ``sync_on_compute``).
        """
        super().__init__(NUM_STATS, **kwargs)

    def update(
        self,
        preds: Sequence[str],
        references: Sequence[Sequence[str]],
        image_ids: Sequence[int | str] | Tensor,
    ) -> None:
        """Add the statistics of one batch of captions.

        Args:
            preds: One predicted caption per image (raw text).
            references: For each image, all its reference captions (raw text), at least one.
            image_ids: One id per image (int or str, or an int tensor from default collate).

        Raises:
            RobucapError: If the three sequences differ in length, an image has no references or an id is invalid.
        """
        if isinstance(preds, str):
            raise RobucapError("preds: expected a list of captions, got a single string")
        ids = _as_id_list(image_ids)
        if not len(preds) == len(references) == len(ids):
            raise RobucapError(
                f"CaptionBLEU.update: preds ({len(preds)}), references ({len(references)}) and image_ids "
                f"({len(ids)}) must have the same length"
            )
        if not ids:
            return
        rows: list[list[int]] = []
        for pred, refs, image_id in zip(preds, references, ids, strict=True):
            if isinstance(refs, str) or len(refs) == 0:
                raise RobucapError(
                    f"references for image_id {image_id!r}: expected a non-empty list of reference captions"
                )
            rows.append(bleu_statistics(pred, refs))
        self._append_rows([image_key(i) for i in ids], rows)

    def compute(self) -> dict[str, Tensor]:
        """Corpus BLEU over the unique images.

        Returns:
            ``{"bleu1": ..., "bleu4": ...}`` as float64 scalar tensors (fractions in [0, 1]); all zeros when no
            image was seen.
        """
        rows = self.unique_rows()
        if rows.shape[0] == 0:
            scores = [0.0] * MAX_N
        else:
            # Integer sums are exact and order-independent, so every process and world size agrees bit for bit.
            scores = _bleu_from_stats(rows.sum(dim=0).tolist())
        return {key: torch.tensor(score, dtype=torch.float64) for key, score in zip(BLEU_KEYS, scores, strict=True)}
