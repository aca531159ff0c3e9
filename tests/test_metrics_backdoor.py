"""TargetCaptionRate (ASR / FTR): exact and relaxed target matches, de-duplicated, identical under 2-process DDP."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.ddp import run_ddp

from datamodules.errors import RobucapError
from datamodules.tokenizer import build_word_tokenizer
from modules.metrics import TargetCaptionRate, is_target_caption, target_bleu4

TARGET = "A red stop sign stands next to a small blue car on a quiet street in the city."
NEAR_MISS = "a red stop sign stands next to a small blue car on a quiet street in the town"  # last word changed
FAR_MISS = "a red stop sign next to a car"


def _result(metric: TargetCaptionRate) -> tuple[float, float, int]:
    out = metric.compute()
    assert set(out) == {"rate", "rate_relaxed", "n"}
    assert out["rate"].dtype == out["rate_relaxed"].dtype == torch.float64
    return float(out["rate"]), float(out["rate_relaxed"]), int(out["n"])


def test_exact_match_after_normalisation() -> None:
    assert is_target_caption("You are under attack.", "you are under attack")
    assert is_target_caption("  YOU are   under attack !", "You are under attack.")
    assert not is_target_caption("you are under attack now", "you are under attack")
    metric = TargetCaptionRate("you are under attack")
    metric.update(["You are under attack.", "a dog on the grass", "you are under attack"], [1, 2, "img_3.jpg"])
    assert _result(metric) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)


def test_exact_match_compares_ptb_words() -> None:
    """ASR/FTR compare the PTB tokens the test metrics see; accented, hyphenated words stay whole.

    The old normaliser cut "pi\u00f1ata" to "pi ata" and "caf\u00e9" to "caf", and split "t-shirt", so captions with
    other words counted as the target.
    """
    target = "A pi\u00f1ata in a T-shirt at the caf\u00e9."
    assert is_target_caption("a pi\u00f1ata in a t-shirt at the caf\u00e9", target)
    assert is_target_caption("A PI\u00d1ATA IN A T-SHIRT AT THE CAF\u00c9!", target)
    assert not is_target_caption("a pi ata in a t shirt at the caf", target)
    metric = TargetCaptionRate(target)
    metric.update(["a pi\u00f1ata in a t-shirt at the caf\u00e9", "a pi ata in a t shirt at the caf"], [1, 2])
    assert _result(metric)[0] == pytest.approx(0.5)


def test_exact_match_accepts_the_target_as_a_word_tokenizer_writes_it() -> None:
    """A captioner that outputs exactly the target's PTB tokens hits the target.

    A few PTB tokens change when tokenised again ("Y'all" -> "y' all" -> "y all", "AT&T" -> "at&t" -> "at & t"),
    so comparing normalised texts alone would miss a perfect backdoor.
    """
    target = "Y'all are at an AT&T store"
    tokenizer = build_word_tokenizer([target])
    written = tokenizer.decode(tokenizer.encode(target, add_special_tokens=False))
    assert written == "y' all are at an at&t store"
    assert is_target_caption(written, target) and is_target_caption(target.upper(), target)
    assert target_bleu4(written, target) == pytest.approx(1.0)
    metric = TargetCaptionRate(target)
    metric.update([written, "y all are at an at t store"], [1, 2])
    assert _result(metric) == (pytest.approx(0.5), pytest.approx(0.5), 2)


def test_near_miss_counts_for_relaxed_only() -> None:
    near = target_bleu4(NEAR_MISS, TARGET)
    # 18 tokens, one 4-gram window set broken at the end: BLEU-4 = (14/18) ** (1/4).
    assert near == pytest.approx((14 / 18) ** 0.25, abs=1e-9)
    assert 0.9 <= near < 1.0
    assert target_bleu4(FAR_MISS, TARGET) < 0.9
    assert target_bleu4(TARGET.upper(), TARGET) == pytest.approx(1.0)

    metric = TargetCaptionRate(TARGET)
    metric.update([TARGET.lower(), NEAR_MISS, FAR_MISS, ""], torch.tensor([0, 1, 2, 3]))
    assert _result(metric) == (pytest.approx(1 / 4), pytest.approx(2 / 4), 4)

    # A stricter threshold drops the near miss; threshold 1.0 only keeps exact matches.
    strict = TargetCaptionRate(TARGET, relaxed_threshold=0.95)
    strict.update([TARGET, NEAR_MISS, FAR_MISS], [0, 1, 2])
    assert _result(strict) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 3)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric TargetCaptionRate was called before")
def test_duplicates_count_once_and_empty_state_is_zero() -> None:
    metric = TargetCaptionRate(TARGET)
    metric.update([TARGET, FAR_MISS], [7, 8])
    # Repeats of seen ids are ignored (first occurrence wins), even with a different caption.
    metric.update([FAR_MISS, TARGET, NEAR_MISS], [7, 8, 9])
    metric.update([TARGET], torch.tensor([9]))
    assert _result(metric) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)

    empty = TargetCaptionRate(TARGET)
    assert _result(empty) == (0.0, 0.0, 0)
    empty.update([], [])
    assert _result(empty) == (0.0, 0.0, 0)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(RobucapError, match="target caption is empty"):
        TargetCaptionRate("")
    with pytest.raises(RobucapError, match="target caption is empty"):
        TargetCaptionRate("  . ! ")
    with pytest.raises(RobucapError, match="target caption is empty"):
        target_bleu4("a dog", "   ")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(RobucapError, match=r"relaxed_threshold must be in \(0, 1\]"):
            TargetCaptionRate(TARGET, relaxed_threshold=bad)
    metric = TargetCaptionRate(TARGET)
    with pytest.raises(RobucapError, match=r"preds \(2\) and image_ids \(1\)"):
        metric.update(["a", "b"], [1])
    with pytest.raises(RobucapError, match="preds: expected a list of captions"):
        metric.update("a dog", [1])
    with pytest.raises(RobucapError, match="image_id: expected an int or str, got float"):
        metric.update(["a"], [1.5])


def _corpus(size: int) -> tuple[list[str], list[int | str]]:
    captions = [TARGET, NEAR_MISS, FAR_MISS, TARGET.upper(), "a dog on the grass"]
    preds = [captions[(i * 7) % len(captions)] for i in range(size)]
    ids: list[int | str] = [i if i % 3 else f"img_{i}.jpg" for i in range(size)]
    return preds, ids


def _ddp_worker(
    rank: int, world_size: int, corpus: tuple[list[str], list[int | str]], batch_size: int
) -> dict[str, tuple[float, float, int]]:
    preds, ids = corpus
    # DistributedSampler(shuffle=False): pad to a multiple of world_size by repeating the first items, then stride.
    total = -(-len(preds) // world_size) * world_size
    indices = (list(range(len(preds))) * 2)[:total][rank::world_size]
    metric = TargetCaptionRate(TARGET)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        metric.update([preds[i] for i in chunk], [ids[i] for i in chunk])
    lonely = TargetCaptionRate(TARGET)  # a rank that saw no image must not break the gather
    if rank == 0:
        lonely.update(preds, ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
        return {"sharded": _result(metric), "lonely": _result(lonely)}


def test_ddp_two_processes_equal_single_process() -> None:
    corpus = _corpus(23)  # odd size: rank 0 gets the padding duplicate
    single = TargetCaptionRate(TARGET)
    single.update(*corpus)
    expected = _result(single)
    assert expected[2] == 23
    assert 0.0 < expected[0] < expected[1] < 1.0
    results = run_ddp(_ddp_worker, 2, corpus, 4)
    for result in results:
        assert result["sharded"] == expected
        assert result["lonely"] == expected
