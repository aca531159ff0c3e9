"""Transfer evaluation: RMSD on the 0-255 scale and the cells of a transfer matrix, with captions we control."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.transfer import (
    evaluate_transfer,
    hits_target,
    matrix_to_json,
    rmsd_255,
    target_word_share,
    transfer_matrix,
)

SIZE = 4
# Five-word captions: BLEU-4 needs 4-grams. Every image has its clean caption as its single reference.
CLEAN = ["a red circle above squares", "a blue square near stars", "a green star beside dots", "a big cross over lines"]
ADVERSARIAL = [
    "A red circle above squares.",  # same caption once normalised: not changed
    "zebra zebra zebra zebra zebra",  # changed, shares no word with the reference
    "a green star beside dots",  # not changed
    "one two six nine ten",  # changed, shares no word with the reference
]
REFERENCES = [[c] for c in CLEAN]
IDS = [10, 11, 12, 13]


class FakeCaptioner(nn.Module):
    """Captions chosen by the test: pixel (0, 0, 0) encodes the image index, pixel (1, 0, 0) > 0.5 marks adversarial."""

    def __init__(self, clean: list[str], adversarial: list[str]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.clean, self.adversarial = clean, adversarial
        self.calls: list[int] = []

    def caption(
        self, pixel_values: torch.Tensor, num_beams: int | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        self.calls.append(pixel_values.shape[0])
        out = []
        for image in pixel_values:
            index = round(float(image[0, 0, 0]) * 10)
            out.append((self.adversarial if float(image[1, 0, 0]) > 0.5 else self.clean)[index])
        return out


def _images(adversarial: bool) -> torch.Tensor:
    x = torch.full((len(CLEAN), 3, SIZE, SIZE), 0.25)
    x[:, 0, 0, 0] = torch.arange(len(CLEAN)) / 10
    x[:, 1, 0, 0] = 0.75 if adversarial else 0.25
    return x


def test_rmsd_by_hand() -> None:
    clean = torch.zeros(2, 3, 2, 2)
    adversarial = clean.clone()
    adversarial[0, 1, 1, 0] = 1.0  # one of 12 values moves by 255
    adversarial[1] += 0.1  # every value moves by 25.5
    rmsd = rmsd_255(clean, adversarial)
    assert rmsd.shape == (2,)
    assert rmsd.tolist() == pytest.approx([255 / math.sqrt(12), 25.5], rel=1e-6)
    assert rmsd_255(clean, clean).tolist() == [0.0, 0.0]
    with pytest.raises(RobucapError, match=r"one shape \(B, 3, H, W\), got \(2, 3, 2, 2\) and \(1, 3, 2, 2\)"):
        rmsd_255(clean, adversarial[:1])


def test_evaluate_transfer_caption_targets() -> None:
    module = FakeCaptioner(CLEAN, ADVERSARIAL)
    targets = [
        CLEAN[0],  # already the clean caption: a hit before and after the attack
        "zebra zebra zebra zebra zebra",  # reached by the attack
        "a dog",  # missed
        "a blue square near stars",  # missed (another image's caption)
    ]
    cell = evaluate_transfer(module, _images(False), _images(True), REFERENCES, IDS, targets, batch_size=3)
    assert cell.n == 4
    assert cell.changed == 0.5
    assert cell.target_hit == 0.5 and cell.target_hit_clean == 0.25
    # Partial transfer: the targets' content words (red circle squares / zebra / dog / blue square stars) found in
    # the adversarial captions: all, all, none, none; in the clean ones: all of the first target only.
    assert cell.target_words == 0.5 and cell.target_words_clean == 0.25
    assert cell.bleu4_clean == pytest.approx(1.0, abs=1e-6)
    # Two of four captions keep all their n-grams, two keep none: every p_n = 1/2, brevity penalty 1.
    assert cell.bleu4_adv == pytest.approx(0.5, abs=1e-6)
    assert cell.bleu4_drop == pytest.approx(0.5, abs=1e-6)
    assert cell.ori_bleu4 == pytest.approx(0.5, abs=1e-6)  # the clean captions are the references here
    assert 0.0 < cell.tgt_bleu4 < 1.0
    assert cell.rmsd == pytest.approx(float(rmsd_255(_images(False), _images(True)).mean()))
    assert module.calls == [3, 1, 3, 1]  # clean then adversarial, in batches of 3
    # results.json stores the scores under their documented keys, without the caption lists.
    assert cell.to_json() == {
        "bleu4_clean": cell.bleu4_clean, "bleu4_adv": cell.bleu4_adv, "bleu4_drop": cell.bleu4_drop, "changed": 0.5,
        "target_hit": 0.5, "target_hit_clean": 0.25, "target_words": 0.5, "target_words_clean": 0.25,
        "ori_bleu4": cell.ori_bleu4, "tgt_bleu4": cell.tgt_bleu4,
        "rmsd": cell.rmsd, "n": 4,
    }  # fmt: skip


def test_evaluate_transfer_keywords_none_and_reuse() -> None:
    module = FakeCaptioner(CLEAN, ADVERSARIAL)
    keywords = [["red", "circle"], ["zebra"], ["dog"], ["one", "ten"]]
    cell = evaluate_transfer(module, _images(False), _images(True), REFERENCES, IDS, keywords)
    assert cell.target_hit == 0.75 and cell.target_hit_clean == 0.25
    assert cell.target_words == 0.75 and cell.target_words_clean == 0.25  # every keyword list is all or nothing here
    assert cell.tgt_bleu4 is None  # Show-and-Fool's tgt score needs caption targets
    cell = evaluate_transfer(module, _images(False), _images(True), REFERENCES, IDS, clean_captions=CLEAN)
    assert cell.target_hit is None and cell.target_hit_clean is None and cell.tgt_bleu4 is None
    assert cell.target_words is None and cell.target_words_clean is None
    assert cell.adversarial_captions == ADVERSARIAL and cell.clean_captions == CLEAN
    assert module.calls[-1] == 4  # given clean captions: only the adversarial images were captioned


def test_target_word_share() -> None:
    """Partial transfer: the share of the target's content words (function and position words do not count)."""
    assert target_word_share("a red square", "a small red circle") == pytest.approx(1 / 3)  # red of small red circle
    assert target_word_share("a small red circle", "the red circle left of a small circle") == 1.0  # words once each
    assert target_word_share("a blue star", "a red circle") == 0.0
    assert target_word_share("a dog's red ball", ["red", "cat"]) == 0.5  # keywords: the keywords themselves
    assert target_word_share("a red circle", "one on the left") is None  # nothing to transfer


def test_hits_target() -> None:
    assert hits_target("A red circle.", "a red circle")
    assert not hits_target("a red circle", "a red")
    assert hits_target("a dog's red ball", ["red", "dog"])
    assert not hits_target("a red ball", ["red", "dog"])


def test_hits_target_ptb_forms() -> None:
    """Keywords that PTB tokenisation splits (``y'all`` -> ``y' all``, ``at&t`` -> ``at & t``) are found as the
    tokens they become, and only as a run: the pieces scattered over the caption are no hit."""
    assert hits_target("y'all love the at&t tower", ["y'all", "at&t"])
    assert hits_target("Y'all love the at&t tower.", "y'all love the at&t tower")
    assert not hits_target("at the t & y' shop all", ["y'all"])
    assert not hits_target("at & the t", ["at&t"])
    assert not hits_target("a red ball", [""])  # an empty keyword is no keyword found


def test_evaluate_transfer_bad_input() -> None:
    module = FakeCaptioner(CLEAN, ADVERSARIAL)
    clean, adversarial = _images(False), _images(True)
    with pytest.raises(RobucapError, match="one shape"):
        evaluate_transfer(module, clean, adversarial[:2], REFERENCES, IDS)
    with pytest.raises(RobucapError, match="4 images need 4 reference lists and 4 image ids, got 3 and 4"):
        evaluate_transfer(module, clean, adversarial, REFERENCES[:3], IDS)
    with pytest.raises(RobucapError, match="image_ids must be unique"):
        evaluate_transfer(module, clean, adversarial, REFERENCES, [1, 1, 2, 3])
    with pytest.raises(RobucapError, match=r"expected one target per image \(4\), got 1"):
        evaluate_transfer(module, clean, adversarial, REFERENCES, IDS, ["a dog"])
    with pytest.raises(RobucapError, match="expected 4 clean captions, got 2"):
        evaluate_transfer(module, clean, adversarial, REFERENCES, IDS, clean_captions=CLEAN[:2])


def test_transfer_matrix() -> None:
    a, b = FakeCaptioner(CLEAN, ADVERSARIAL), FakeCaptioner(CLEAN, CLEAN)  # b is never fooled
    clean = _images(False)
    sources = {"a": _images(True), "b": _images(True) + 0.0}
    sources["b"][:, 2] += 0.1  # a different distortion per source
    targets = {"a": ["zebra zebra zebra zebra zebra"] * 4, "b": ["a dog"] * 4}
    matrix = transfer_matrix(sources, {"a": a, "b": b}, clean, REFERENCES, IDS, targets)
    assert set(matrix) == {"a", "b"} and all(set(row) == {"a", "b"} for row in matrix.values())
    assert matrix["a"]["a"].changed == 0.5 and matrix["a"]["b"].changed == 0.0
    assert matrix["a"]["a"].target_hit == 0.25 and matrix["b"]["a"].target_hit == 0.0
    expected_rmsd = float(rmsd_255(clean, sources["b"]).mean())
    assert matrix["b"]["a"].rmsd == matrix["b"]["b"].rmsd == pytest.approx(expected_rmsd)
    assert matrix["a"]["a"].rmsd < matrix["b"]["a"].rmsd
    # Each model captions the clean images once (one call), then each source's images once.
    assert a.calls == [4, 4, 4] and b.calls == [4, 4, 4]
    as_json = matrix_to_json(matrix)
    assert as_json["b"]["a"] == matrix["b"]["a"].to_json() and json.loads(json.dumps(as_json)) == as_json
    with pytest.raises(RobucapError, match=r"no targets for sources \['b'\]"):
        transfer_matrix(sources, {"a": a}, clean, REFERENCES, IDS, {"a": targets["a"]})
