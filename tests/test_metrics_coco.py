"""coco_caption_scores (pycocoevalcap with and without Java) and gather_unique (1 and 2 processes)."""

from __future__ import annotations

import subprocess
import warnings
from typing import Any

import pytest
import torch
from helpers.ddp import run_ddp
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import modules.metrics.coco_eval as coco_eval
from datamodules.errors import RobucapError
from datamodules.text import normalize_caption
from modules.metrics import COCO_KEYS, coco_caption_scores, gather_unique, java_available

needs_java = pytest.mark.skipif(not java_available(), reason="Java is needed for the PTB tokenizer and METEOR")

REFERENCES: dict[Any, list[str]] = {
    1: ["A dog runs across the green grass.", "A brown dog is running on a lawn."],
    2: ["Two people ride bicycles down a city street.", "Cyclists on a busy road."],
    "img_3.jpg": ["A man's hat sits on a wooden table.", "There is a hat on the table."],
    4: ["A child plays with a red ball in the park.", "A kid throws a ball."],
}
# Each prediction is one of its image's references, re-cased and re-punctuated.
EXACT = {
    1: "a dog runs across the green grass",
    2: "Cyclists on a busy road!",
    "img_3.jpg": "A MAN'S HAT SITS ON A WOODEN TABLE",
    4: "A kid throws a ball",
}
GOOD = {
    1: "a dog runs on the grass",
    2: "two people ride bicycles on a street",
    "img_3.jpg": "a hat on a wooden table",
    4: "a child plays with a ball",
}
BAD = {
    1: "a cat sleeps on a sofa",
    2: "a plate of food",
    "img_3.jpg": "two dogs play in snow",
    4: "an old building at night",
}


def _stock_pipeline(predictions: dict[Any, str], references: dict[Any, list[str]]) -> dict[str, float]:
    """What COCOEvalCap does: stock PTBTokenizer on references and predictions, then the scorers."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n}": b for n, b in enumerate(bleu, start=1)}, "rouge_l": float(rouge), "cider": float(cider)}


@needs_java
def test_exact_predictions_with_meteor_and_no_leaked_process(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []

    class SpyMeteor(coco_eval._Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self.meteor_p)

    monkeypatch.setattr(coco_eval, "_Meteor", SpyMeteor)
    scores = coco_caption_scores(EXACT, REFERENCES)  # the one METEOR run of the suite (~10 s of JVM start-up)
    assert set(scores) == set(COCO_KEYS)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6)
    for key in ("meteor", "rouge_l"):
        assert 0.0 < scores[key] <= 1.0
    assert scores["meteor"] > 0.9
    assert scores["cider"] > 0.0
    assert len(started) == 1 and started[0].returncode is not None  # the JVM has exited and been reaped


@needs_java
def test_matches_stock_pycocoevalcap_pipeline_and_orders_cider() -> None:
    good = coco_caption_scores(GOOD, REFERENCES, meteor=False)
    assert "meteor" not in good
    assert good == pytest.approx(_stock_pipeline(GOOD, REFERENCES), abs=1e-12)
    bad = coco_caption_scores(BAD, REFERENCES, meteor=False)
    assert all(0.0 <= bad[k] <= 1.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"))
    assert good["cider"] > bad["cider"] >= 0.0
    assert good["bleu4"] > bad["bleu4"] and good["rouge_l"] > bad["rouge_l"]


def test_without_java_uses_normaliser_and_skips_meteor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco_eval.shutil, "which", lambda name, *a, **k: None)

    def no_subprocess(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no Java process may be started without Java")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.warns(RuntimeWarning, match="METEOR skipped: Java not found"):
        scores = coco_caption_scores(GOOD, REFERENCES)
    assert set(scores) == set(COCO_KEYS) - {"meteor"}
    gts = {k: [normalize_caption(c) for c in v] for k, v in REFERENCES.items()}
    res = {k: [normalize_caption(GOOD[k])] for k in REFERENCES}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [scores[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    # Without METEOR requested there is nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "meteor" not in coco_caption_scores(GOOD, REFERENCES, meteor=False)


@needs_java
def test_without_java_the_scores_equal_the_ptb_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Java the test metrics tokenise like the PTB tokenizer, so the scores agree.

    The old fallback split "t-shirt", "2.5" and "1,000" and dropped accented letters.
    """
    references: dict[Any, list[str]] = {
        1: ["A man in a black-and-white t-shirt holds an x-ray.", "A man's T-shirt (black & white)."],
        2: ["A caf\u00e9 cr\u00e8me and a pi\u00f1ata in Z\u00fcrich.", "Two dogs, 1,000 birds and 3.5 cats at 10am."],
        3: ["The dog doesn\u2019t like the kids\u2019 toys...", '\u201cStop!" says a 2.5-meter sign \U0001f6d1'],
    }
    predictions = {1: "a man in a black and white t shirt", 2: "a cafe creme and 1 000 birds", 3: "a 2.5-meter sign"}
    with_java = coco_caption_scores(predictions, references, meteor=False)
    monkeypatch.setattr(coco_eval, "java_available", lambda: False)
    without_java = coco_caption_scores(predictions, references, meteor=False)
    assert without_java == pytest.approx(with_java, abs=1e-12)


def test_meteor_failure_warns_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []

    class BrokenMeteor:
        def compute_score(self, gts: object, res: object) -> None:
            raise ValueError("could not convert string to float: b''")

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(coco_eval, "_Meteor", BrokenMeteor)
    monkeypatch.setattr(coco_eval, "java_available", lambda: True)
    monkeypatch.setattr(coco_eval, "ptb_tokenize", lambda captions: [normalize_caption(c) for c in captions])
    with pytest.warns(RuntimeWarning, match="METEOR skipped: the Java scorer failed"):
        scores = coco_caption_scores(GOOD, REFERENCES)
    assert "meteor" not in scores and "cider" in scores
    assert closed == [True]


def test_validation_errors_and_empty_input() -> None:
    with pytest.raises(RobucapError, match=r"3 predictions vs 4 references; 1 image ids without a prediction"):
        coco_caption_scores({k: GOOD[k] for k in (1, 2, 4)}, REFERENCES, meteor=False)
    with pytest.raises(RobucapError, match=r"image ids without references, e\.g\. \[9\]"):
        coco_caption_scores({**GOOD, 9: "x"}, REFERENCES, meteor=False)
    with pytest.raises(RobucapError, match="image id 4 has an empty reference list"):
        coco_caption_scores(GOOD, {**REFERENCES, 4: []}, meteor=False)
    with pytest.raises(RobucapError, match="references for image id 4 must be a list of captions, got str"):
        coco_caption_scores(GOOD, {**REFERENCES, 4: "a kid"}, meteor=False)
    assert coco_caption_scores({}, {}, meteor=False) == dict.fromkeys(set(COCO_KEYS) - {"meteor"}, 0.0)


def test_gather_unique_single_process() -> None:
    records = [
        {"image_id": 3, "caption": "first"},
        {"image_id": "b.jpg", "caption": "x"},
        {"image_id": torch.tensor(3), "caption": "padding duplicate"},
        {"image_id": 10, "caption": "y"},
        {"image_id": "10", "caption": "a string id, not the int"},
    ]
    out = gather_unique(records)
    assert [r["caption"] for r in out] == ["y", "a string id, not the int", "first", "x"]
    assert gather_unique(records[:2], key="caption") == sorted(records[:2], key=lambda r: r["caption"])
    with pytest.raises(RobucapError, match="record 1: missing field 'image_id'"):
        gather_unique([{"image_id": 1}, {"caption": "no id"}])


def _gather_worker(rank: int, world_size: int, num_images: int) -> list[dict[str, Any]]:
    # DistributedSampler-style shards: pad by repeating the first items, then stride by rank.
    total = -(-num_images // world_size) * world_size
    indices = (list(range(num_images)) * 2)[:total][rank::world_size]
    return gather_unique([{"image_id": i, "caption": f"caption {i}", "rank": rank} for i in indices])


def test_gather_unique_two_processes() -> None:
    results = run_ddp(_gather_worker, 2, 7)
    assert results[0] == results[1]
    assert [r["image_id"] for r in results[0]] == sorted(range(7), key=str)
    # Image 0 appears on rank 0 and, as padding, on rank 1: rank 0's copy is kept.
    assert results[0][0] == {"image_id": 0, "caption": "caption 0", "rank": 0}
