"""Liu et al. 2017's ensemble objective (eq. 6) over captioners: validation, the objective against a hand computation,
and the three methods (optimisation, FG, FGS) as attacks run on it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.attacks import ENSEMBLE_METHODS, FG, FGSM, Optimization, build_attack
from modules.captioners import Captioner, build_captioner
from modules.victims import CaptionObjective, EnsembleObjective, caption_ensemble, ensemble_log_likelihood

IMAGE_SIZE = 32
VOCAB = VocabInfo(40, 0, 1, 2)
TARGETS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _captioner(seed: int, arch: str = "vit_gpt2", vocab: VocabInfo = VOCAB, size: int = IMAGE_SIZE) -> Captioner:
    torch.manual_seed(seed)
    return build_captioner(arch, vocab, size).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[Captioner, Captioner]:
    return _captioner(0), _captioner(1, arch="show_attend_tell")


@pytest.fixture
def members(pair: tuple[Captioner, Captioner]) -> list[Captioner]:
    """Private copies, so tests that change modes or grads cannot leak into each other."""
    return [copy.deepcopy(m) for m in pair]


def _images(n: int = 3, low: float = 0.0, high: float = 1.0, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


# -- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, r"weights: expected one weight per member \(2\), got 1"),
        ({"weights": [1.0, 0.0]}, "weights must all be numbers > 0"),
        ({"weights": [1.0, -2.0]}, "weights must all be numbers > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_ensembles_are_named(members: list[Captioner], kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        caption_ensemble(members, _images(), **kwargs)


def test_bad_members(members: list[Captioner]) -> None:
    x = _images()
    with pytest.raises(RobucapError, match="at least one member captioner"):
        caption_ensemble([], x)
    with pytest.raises(RobucapError, match="ensemble member 0 must be a Captioner, got int"):
        caption_ensemble([3], x)  # type: ignore[list-item]
    small, large = members[0], _captioner(2, size=64)
    with pytest.raises(RobucapError, match="member 0 takes 32 px, member 1 takes 64 px"):
        caption_ensemble([small, large], x)
    other_vocab = _captioner(3, vocab=VocabInfo(50, 0, 1, 2))
    with pytest.raises(RobucapError, match="a targeted ensemble needs members with one shared vocabulary"):
        caption_ensemble([small, other_vocab], x, TARGETS)
    caption_ensemble([small, other_vocab], x)  # non-targeted: each member is scored on its own caption
    with pytest.raises(RobucapError, match="ensemble members must be all targeted or all non-targeted"):
        EnsembleObjective([CaptionObjective.targeting(small, TARGETS), CaptionObjective.own_captions(small, x)])
    with pytest.raises(RobucapError, match="built for different numbers of images"):
        EnsembleObjective([CaptionObjective.targeting(small, TARGETS), CaptionObjective.targeting(small, TARGETS[:2])])


def test_bad_targets_and_images(members: list[Captioner]) -> None:
    x = _images()
    with pytest.raises(RobucapError, match=r"expected one target per image \(3\), got 2"):
        caption_ensemble(members, x, TARGETS[:2])
    with pytest.raises(RobucapError, match="the target of image 1 is empty"):
        caption_ensemble(members, x, [[5], [], [6]])
    with pytest.raises(RobucapError, match=r"the target of image 0 must be token ids in \[0, 40\)"):
        caption_ensemble(members, x, [[40], [5], [6]])
    with pytest.raises(RobucapError, match=r"members take \(B, 3, 32, 32\) images, got \(3, 3, 16, 16\)"):
        caption_ensemble(members, torch.rand(3, 3, 16, 16), TARGETS)
    with pytest.raises(RobucapError, match=r"exceeds sqrt\(3\*32\*32\) = 55.4"):
        FG(60.0)(caption_ensemble(members, x), x)


def test_weights_equal_by_default_and_normalised(members: list[Captioner]) -> None:
    x = _images()
    assert caption_ensemble(members, x).weights.tolist() == [0.5, 0.5]
    assert caption_ensemble(members, x, weights=[1, 3]).weights.tolist() == [0.25, 0.75]
    assert caption_ensemble(members[:1], x).weights.tolist() == [1.0]


def test_the_three_methods_are_attack_names() -> None:
    assert ENSEMBLE_METHODS == ("optimization", "fg", "fgs")
    assert isinstance(build_attack("optimization"), Optimization)
    assert isinstance(build_attack("fg", 1.0), FG) and isinstance(build_attack("fgs", 0.1), FGSM)
    with pytest.raises(RobucapError, match=r"epsilon must be in \[0, 1\]"):
        build_attack("fgs", 1.5)
    with pytest.raises(RobucapError, match="FG epsilon is an L2 budget and must be a number >= 0"):
        build_attack("fg", -1.0)
    with pytest.raises(RobucapError, match="attack 'optimization' has no budget"):
        build_attack("optimization", 0.1)


# -- the objective --------------------------------------------------------------------------------------------------
def _hand_nll(captioner: Captioner, x: torch.Tensor, captions: list[list[int]]) -> list[float]:
    """-log P(caption + EOS | x) by summing log-softmax entries one caption at a time."""
    out = []
    for i, caption in enumerate(captions):
        sequence = [*caption, VOCAB.eos_token_id]
        with torch.no_grad():
            logits = captioner(x[i : i + 1], torch.tensor([sequence])).logits[0].double()
        log_probs = F.log_softmax(logits, dim=-1)
        out.append(-sum(float(log_probs[t, token]) for t, token in enumerate(sequence)))
    return out


def test_objective_is_eq6_by_hand(members: list[Captioner]) -> None:
    x = _images()
    objective = caption_ensemble(members, x, TARGETS, weights=[1, 3])
    with torch.no_grad():
        value = objective.loss(x)
    nll = [_hand_nll(m, x, TARGETS) for m in members]
    for i in range(len(TARGETS)):
        expected = -math.log(0.25 * math.exp(-nll[0][i]) + 0.75 * math.exp(-nll[1][i]))
        assert float(value[i]) == pytest.approx(expected, rel=1e-4)
    # The non-targeted objective is +log of the same mixture, over each member's own clean caption.
    untargeted = caption_ensemble(members, x, weights=[1, 3])
    with torch.no_grad():
        value = untargeted.loss(x)
    own = [m.labels for m in untargeted.members]  # type: ignore[attr-defined]
    for k, member in enumerate(members):
        generated = member.generate(x, max_new_tokens=32)
        for i in range(len(x)):
            row = generated[i].tolist()
            caption = row[: row.index(VOCAB.eos_token_id)] if VOCAB.eos_token_id in row else row
            assert own[k][i][own[k][i].ne(-100)].tolist() == [*caption, VOCAB.eos_token_id]
    own_captions = [[[t for t in y[i].tolist() if t != -100][:-1] for i in range(len(x))] for y in own]
    nll = [_hand_nll(m, x, c) for m, c in zip(members, own_captions, strict=True)]
    for i in range(len(x)):
        expected = math.log(0.25 * math.exp(-nll[0][i]) + 0.75 * math.exp(-nll[1][i]))
        assert float(value[i]) == pytest.approx(expected, rel=1e-4)


def test_log_likelihood_is_stable() -> None:
    # exp(-2000) underflows to 0 in float64: logsumexp still gives the exact value.
    log_p = torch.tensor([[-2000.0], [-2001.0]], dtype=torch.float64)
    value = ensemble_log_likelihood(log_p, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert float(value) == pytest.approx(-2000 + math.log(0.5 * (1 + math.exp(-1))))


def test_distance_term_belongs_to_the_optimisation(members: list[Captioner]) -> None:
    """lambda ||x' - x||^2 is the attack's (it needs the clean image); the objective is eq. 6 alone."""
    x = _images()
    objective = caption_ensemble(members, x, TARGETS)
    torch.manual_seed(0)
    plain = Optimization(iterations=3, lr=0.05)(objective, x)
    anchored = Optimization(iterations=3, lr=0.05, distance_weight=1e4)(objective, x)
    assert (anchored.l2 < plain.l2).all()


# -- the methods ----------------------------------------------------------------------------------------------------
def test_targeted_optimisation_lowers_the_ensemble_nll(members: list[Captioner]) -> None:
    x = _images()
    objective = caption_ensemble(members, x, TARGETS)
    result = Optimization(iterations=20, lr=0.05)(objective, x)
    with torch.no_grad():
        before, after = objective.loss(x), objective.loss(result.adversarial)
    assert (after < before - 0.2).all(), (before, after)
    adversarial = result.adversarial
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and adversarial.shape == x.shape
    assert result.iterations.tolist() == [20] * 3 and result.success is not None  # targeted: a finish line


def test_non_targeted_optimisation_lowers_the_clean_caption_probability(members: list[Captioner]) -> None:
    x = _images()
    objective = caption_ensemble(members, x)
    result = Optimization(iterations=10, lr=0.02)(objective, x)
    with torch.no_grad():
        before, after = objective.loss(x), objective.loss(result.adversarial)
    assert (after < before).all(), (before, after)
    assert result.success is None


def test_fast_gradient_budgets(members: list[Captioner]) -> None:
    # Images away from 0 and 1, so clipping cannot change the step.
    x = _images(low=0.3, high=0.7)
    fg = FG(2.0)(caption_ensemble(members, x, TARGETS), x)
    torch.testing.assert_close(fg.l2, torch.full((3,), 2.0))
    fgs = FGSM(0.03)(caption_ensemble(members, x), x)
    torch.testing.assert_close(fgs.linf, torch.full((3,), 0.03))
    # Full-range images: the result is clipped to [0, 1].
    wide = _images()
    for attack in (FGSM(0.5), FG(40.0)):
        out = attack(caption_ensemble(members, wide), wide).adversarial
        assert out.min() >= 0 and out.max() <= 1


def test_one_member_is_that_members_caption_nll(members: list[Captioner]) -> None:
    """With one member, eq. 6 is that member's summed caption NLL: FG / FGS on it step as on the member's loss."""
    x = _images(low=0.2, high=0.8)
    single = members[:1]
    target = CaptionObjective.targeting(single[0], TARGETS, loss="log_prob")
    with torch.no_grad():
        torch.testing.assert_close(caption_ensemble(single, x, TARGETS).loss(x), target.loss(x))
    for attack in (FG(1.0), FGSM(0.02)):
        ours = attack(caption_ensemble(single, x, TARGETS), x).adversarial
        mean_ce = CaptionObjective.targeting(single[0], TARGETS, loss="cross_entropy")
        torch.testing.assert_close(ours, attack(mean_ce, x).adversarial, atol=1e-5, rtol=0)


def test_inference_mode_grads_and_modes(members: list[Captioner]) -> None:
    members[0].train()
    x = _images()
    with torch.inference_mode():
        optimized = Optimization(iterations=2)(caption_ensemble(members, x, TARGETS), x).adversarial
        fast = FGSM(0.05)(caption_ensemble(members, x), x).adversarial
    for out in (optimized, fast):
        assert out.shape == x.shape and not out.requires_grad
        assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(optimized, x)
    assert all(p.grad is None for m in members for p in m.parameters())
    assert members[0].training and not members[1].training
