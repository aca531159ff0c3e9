"""Show-and-Fool's report figures for targeted caption / keyword attacks, from per-image records.

* Table 1: success rate and the mean ``||delta||_2`` over the **successful** adversarial examples.
* Table 2: how close the failed examples still come to the target: BLEU-1..4, ROUGE-L and METEOR of their captions
  against the target caption as the single reference (pycocoevalcap, corpus level).
* Table 3 (keyword mode): partial success, the number of target keywords found in the captions of the failed
  examples (``M'``): its mean, its histogram and the share with at least one keyword.

A record is one attacked image: ``success`` (bool), ``l2`` (float, [0, 1] pixel units), ``prediction`` (the caption
of the adversarial image) and ``target`` (a caption string, or a list of keywords). Keyword records may carry
``target_caption``, the caption the keywords were drawn from: it is the reference of their Table 2 scores (records
without it, e.g. fixed user keywords, are counted but not scored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from datamodules.errors import RobucapError
from datamodules.text import caption_tokens, normalize_caption
from modules.metrics.coco_eval import coco_caption_scores

__all__ = ["FAILURE_SCORES", "keywords_found", "summarize_targeted"]

FAILURE_SCORES: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor")
"""The caption scores of Show-and-Fool's Table 2, in its order."""


def keywords_found(prediction: str, keywords: Sequence[str]) -> int:
    """How many of ``keywords`` occur as words of ``prediction`` (after caption normalisation)."""
    words = set(caption_tokens(prediction))
    return sum(normalize_caption(k) in words for k in keywords)


def _check(records: Sequence[Mapping[str, Any]]) -> bool:
    """Validate the records; return whether they are keyword records."""
    if not records:
        raise RobucapError("summarize_targeted needs at least one record (an attacked image)")
    kinds = set()
    for i, record in enumerate(records):
        missing = [k for k in ("success", "l2", "prediction", "target") if k not in record]
        if missing:
            raise RobucapError(f"targeted-attack record {i} lacks {missing} (needs success, l2, prediction, target)")
        l2 = record["l2"]
        if isinstance(l2, bool) or not isinstance(l2, int | float) or not math.isfinite(l2) or l2 < 0:
            raise RobucapError(f"targeted-attack record {i}: l2 must be a finite number >= 0, got {l2!r}")
        if not isinstance(record["prediction"], str):
            raise RobucapError(f"targeted-attack record {i}: prediction must be a caption string")
        target = record["target"]
        if isinstance(target, str):
            kinds.add("caption")
        elif isinstance(target, Sequence) and target and all(isinstance(k, str) for k in target):
            kinds.add("keyword")
        else:
            raise RobucapError(
                f"targeted-attack record {i}: target must be a caption string or a non-empty list of keywords, "
                f"got {target!r}"
            )
    if len(kinds) > 1:
        raise RobucapError("summarize_targeted: records mix target captions and target keywords; summarize each mode")
    return kinds == {"keyword"}


def _failure_scores(failures: Sequence[Mapping[str, Any]], keyword_mode: bool, meteor: bool) -> dict[str, Any]:
    """Table 2's block: counts, mean distortion and caption scores of the failed examples."""
    reference = "target_caption" if keyword_mode else "target"
    scored = [r for r in failures if isinstance(r.get(reference), str) and r[reference].strip()]
    block: dict[str, Any] = {
        "n": len(failures),
        "n_scored": len(scored),
        "mean_l2": sum(float(r["l2"]) for r in failures) / len(failures) if failures else None,
    }
    scores: dict[str, float] = {}
    if scored:
        # Positional keys: image ids need not be unique across records (the same image under several targets).
        scores = coco_caption_scores(
            {i: r["prediction"] for i, r in enumerate(scored)},
            {i: [r[reference]] for i, r in enumerate(scored)},
            meteor=meteor,
        )
    for key in FAILURE_SCORES:
        block[key] = float(scores[key]) if key in scores else None
    return block


def summarize_targeted(records: Sequence[Mapping[str, Any]], meteor: bool = True) -> dict[str, Any]:
    """Show-and-Fool's Tables 1-3 for one attack mode.

    Args:
        records: One per attacked image, with ``success``, ``l2``, ``prediction``, ``target`` (caption string or
            keyword list) and, for keyword targets, optionally ``target_caption``.
        meteor: Compute METEOR for the failures (a Java process, ~10 s to start); ``None`` in the result otherwise.

    Returns:
        ``success_rate`` (fraction), ``n``, ``n_success``, ``mean_l2`` (over successes; ``None`` without any),
        ``failures`` = ``{n, n_scored, mean_l2, bleu1..bleu4, rouge_l, meteor}`` (scores ``None`` when nothing was
        scored), and for keyword records ``keywords_found_mean`` (mean ``M'`` over the failures, ``None`` without
        failures), ``keywords_found_any`` (share of failures with ``M' >= 1``) and ``keywords_found_histogram``
        (``{M': number of failures}`` for every ``M'`` from 0 to the most keywords of a target).

    Raises:
        RobucapError: No records, a record without the required fields or with a bad value, or records mixing
            caption and keyword targets.
    """
    keyword_mode = _check(records)
    successes = [r for r in records if bool(r["success"])]
    failures = [r for r in records if not bool(r["success"])]
    summary: dict[str, Any] = {
        "n": len(records),
        "n_success": len(successes),
        "success_rate": len(successes) / len(records),
        "mean_l2": sum(float(r["l2"]) for r in successes) / len(successes) if successes else None,
        "failures": _failure_scores(failures, keyword_mode, meteor),
    }
    if keyword_mode:
        found = [keywords_found(r["prediction"], r["target"]) for r in failures]
        most = max(len(r["target"]) for r in records)
        summary["keywords_found_mean"] = sum(found) / len(found) if found else None
        summary["keywords_found_any"] = sum(f >= 1 for f in found) / len(found) if found else None
        summary["keywords_found_histogram"] = {m: found.count(m) for m in range(most + 1)}
    return summary
