"""Show-and-Fool's report figures (Tables 1-3) from hand-made Show-and-Fool records."""

from __future__ import annotations

from typing import Any

import pytest

from datamodules.errors import RobucapError
from modules.metrics import coco_caption_scores
from modules.metrics.targeted import FAILURE_SCORES, keywords_found, summarize_targeted


def _record(success: bool, l2: float, prediction: str, target: Any, **extra: Any) -> dict[str, Any]:
    return {"success": success, "l2": l2, "prediction": prediction, "target": target, **extra}


CAPTION_RECORDS = [
    _record(True, 1.0, "a red circle", "a red circle"),
    _record(False, 5.0, "a blue square above a red circle", "a blue square below a red circle"),
    _record(True, 3.0, "a green triangle", "a green triangle"),
    _record(False, 7.0, "a large yellow cross", "a small yellow cross to the left of a red circle"),
]


def test_caption_mode_tables_1_and_2() -> None:
    summary = summarize_targeted(CAPTION_RECORDS, meteor=False)
    assert (summary["n"], summary["n_success"], summary["success_rate"]) == (4, 2, 0.5)
    assert summary["mean_l2"] == pytest.approx(2.0)  # successes only: (1 + 3) / 2
    failures = summary["failures"]
    assert (failures["n"], failures["n_scored"], failures["mean_l2"]) == (2, 2, pytest.approx(6.0))
    # The failures alone, each against its own target as the single reference.
    expected = coco_caption_scores(
        {0: CAPTION_RECORDS[1]["prediction"], 1: CAPTION_RECORDS[3]["prediction"]},
        {0: [CAPTION_RECORDS[1]["target"]], 1: [CAPTION_RECORDS[3]["target"]]},
        meteor=False,
    )
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert failures[key] == pytest.approx(expected[key])
    assert 0.0 < failures["bleu1"] < 1.0 and failures["meteor"] is None  # meteor=False
    assert set(FAILURE_SCORES) <= set(failures)
    assert "keywords_found_mean" not in summary


def test_all_or_nothing() -> None:
    all_failed = summarize_targeted([{**r, "success": False} for r in CAPTION_RECORDS], meteor=False)
    assert all_failed["success_rate"] == 0.0 and all_failed["mean_l2"] is None
    assert all_failed["failures"]["mean_l2"] == pytest.approx(4.0)
    all_won = summarize_targeted([{**r, "success": True} for r in CAPTION_RECORDS], meteor=False)
    assert all_won["success_rate"] == 1.0 and all_won["mean_l2"] == pytest.approx(4.0)
    assert all_won["failures"]["n"] == 0 and all(all_won["failures"][k] is None for k in FAILURE_SCORES)


def test_keyword_mode_partial_success() -> None:
    keywords = ["dog", "cat", "frisbee"]
    records = [
        _record(True, 1.0, "a dog and a cat playing with a frisbee", keywords, target_caption="a dog and a cat"),
        _record(False, 2.0, "a cake on a plate", keywords, target_caption="a dog and a cat with a frisbee"),
        _record(False, 4.0, "a Dog's frisbee on the grass", keywords, target_caption="a dog with a frisbee"),
        _record(False, 6.0, "a cat on a table", keywords),  # fixed keywords: no caption to score against
    ]
    summary = summarize_targeted(records, meteor=False)
    assert (summary["n"], summary["n_success"]) == (4, 1)
    assert summary["mean_l2"] == pytest.approx(1.0)
    # Failures find 0, 2 ("dog" via the clitic split, "frisbee") and 1 keywords: M' histogram over 0..3.
    assert summary["keywords_found_histogram"] == {0: 1, 1: 1, 2: 1, 3: 0}
    assert summary["keywords_found_mean"] == pytest.approx(1.0)
    assert summary["keywords_found_any"] == pytest.approx(2 / 3)
    failures = summary["failures"]
    assert (failures["n"], failures["n_scored"], failures["mean_l2"]) == (3, 2, pytest.approx(4.0))
    expected = coco_caption_scores(
        {0: "a cake on a plate", 1: "a Dog's frisbee on the grass"},
        {0: ["a dog and a cat with a frisbee"], 1: ["a dog with a frisbee"]},
        meteor=False,
    )
    assert failures["bleu1"] == pytest.approx(expected["bleu1"])
    assert failures["rouge_l"] == pytest.approx(expected["rouge_l"])


def test_keywords_found_normalises() -> None:
    assert keywords_found("A DOG, a cat.", ["dog", "Cat", "bird"]) == 2
    assert keywords_found("", ["dog"]) == 0


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "needs at least one record"),
        ([{"success": True, "l2": 1.0, "prediction": "a"}], r"record 0 lacks \['target'\]"),
        ([_record(True, -1.0, "a", "a b")], "l2 must be a finite number >= 0, got -1.0"),
        ([_record(True, 1.0, "a", [])], "non-empty list of keywords"),
        ([_record(True, 1.0, "a", "a b"), _record(True, 1.0, "a", ["b"])], "mix target captions and target keywords"),
    ],
)
def test_bad_records(records: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        summarize_targeted(records, meteor=False)
