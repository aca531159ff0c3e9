"""EnsembleAttack (Liu et al. 2017, eq. 6): validation, the objective against a hand computation, the three methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.attacks.ensemble import EnsembleAttack, caption_labels, ensemble_log_likelihood
from modules.attacks.fg import FG
from modules.attacks.fgsm import FGSM
from modules.captioners import Captioner, build_captioner

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
        ({"method": "pgd"}, r"method must be one of \['optimization', 'fg', 'fgs'\], got 'pgd'"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"distance_weight": -1.0}, "distance_weight .* must be >= 0"),
        ({"method": "fgs", "epsilon": 1.5}, r"fgs epsilon .* must be in \[0, 1\]"),
        ({"method": "fg", "epsilon": -1.0}, "fg epsilon is an L2 budget and must be a number >= 0"),
        ({"method": "fg"}, "method 'fg' needs epsilon"),
        ({"epsilon": 0.1}, "the optimization method has none"),
    ],
)
def test_bad_settings(members: list[Captioner], kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        EnsembleAttack(members, **kwargs)


def test_bad_members() -> None:
    with pytest.raises(RobucapError, match="needs at least one member captioner, got none"):
        EnsembleAttack([])
    with pytest.raises(RobucapError, match="member 0 must be a Captioner, got int"):
        EnsembleAttack([3])
    small, large = _captioner(0), _captioner(0, size=64)
    with pytest.raises(RobucapError, match="one size .* member 0 takes 32 px, member 1 takes 64 px"):
        EnsembleAttack([small, large])
    other_vocab = _captioner(1, vocab=VocabInfo(41, 0, 1, 2))
    with pytest.raises(RobucapError, match="targeted EnsembleAttack needs members with one shared vocabulary"):
        EnsembleAttack([small, other_vocab], targeted=True)
    # Non-targeted: each member scores its own caption, so vocabularies may differ.
    EnsembleAttack([small, other_vocab], targeted=False)


def test_bad_calls(members: list[Captioner]) -> None:
    x = _images()
    targeted = EnsembleAttack(members, targeted=True, iterations=1)
    with pytest.raises(RobucapError, match="a targeted EnsembleAttack needs targets"):
        targeted(x)
    with pytest.raises(RobucapError, match=r"expected one target per image \(3\), got 2"):
        targeted(x, TARGETS[:2])
    with pytest.raises(RobucapError, match="the target of image 1 is empty"):
        targeted(x, [[5], [], [6]])
    with pytest.raises(RobucapError, match=r"the target of image 0 must be token ids in \[0, 40\)"):
        targeted(x, [[40], [5], [6]])
    with pytest.raises(RobucapError, match="members take 32x32 images, got 16x16"):
        targeted(torch.rand(3, 3, 16, 16), TARGETS)
    with pytest.raises(RobucapError, match=r"expects pixel_values \(B, 3, H, W\)"):
        targeted(torch.rand(3, IMAGE_SIZE, IMAGE_SIZE), TARGETS)
    with pytest.raises(RobucapError, match="a non-targeted EnsembleAttack takes no targets"):
        EnsembleAttack(members, iterations=1)(x, TARGETS)
    with pytest.raises(RobucapError, match=r"exceeds sqrt\(3\*32\*32\) = 55.4"):
        EnsembleAttack(members, method="fg", epsilon=60.0)(x)


def test_weights_equal_by_default_and_normalised(members: list[Captioner]) -> None:
    assert EnsembleAttack(members).weights.tolist() == [0.5, 0.5]
    assert EnsembleAttack(members, weights=[1, 3]).weights.tolist() == [0.25, 0.75]
    assert EnsembleAttack(members[:1]).weights.tolist() == [1.0]


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
    attack = EnsembleAttack(members, weights=[1, 3], targeted=True)
    labels = attack.member_labels(x, TARGETS)
    with torch.no_grad():
        value = attack.objective(x, labels)
    nll = [_hand_nll(m, x, TARGETS) for m in members]
    for i in range(len(TARGETS)):
        expected = -math.log(0.25 * math.exp(-nll[0][i]) + 0.75 * math.exp(-nll[1][i]))
        assert float(value[i]) == pytest.approx(expected, rel=1e-4)
    # The non-targeted objective is +log of the same mixture, over each member's own clean caption.
    untargeted = EnsembleAttack(members, weights=[1, 3])
    own = untargeted.member_labels(x)
    with torch.no_grad():
        value = untargeted.objective(x, own)
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
    nll = torch.tensor([[2000.0], [2001.0]], dtype=torch.float64)
    value = ensemble_log_likelihood(nll, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert float(value) == pytest.approx(-2000 + math.log(0.5 * (1 + math.exp(-1))))


def test_distance_term(members: list[Captioner]) -> None:
    x = _images()
    shifted = (x + 0.01).clamp(0, 1)
    attack = EnsembleAttack(members, targeted=True, distance_weight=2.0)
    labels = attack.member_labels(x, TARGETS)
    with torch.no_grad():
        without = EnsembleAttack(members, targeted=True).objective(shifted, labels)
        with_distance = attack.objective(shifted, labels, clean=x)
    distance = (shifted - x).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(with_distance, without + 2.0 * distance)


# -- the methods ----------------------------------------------------------------------------------------------------
def test_targeted_optimisation_lowers_the_ensemble_nll(members: list[Captioner]) -> None:
    x = _images()
    attack = EnsembleAttack(members, targeted=True, iterations=20, lr=0.05)
    labels = attack.member_labels(x, TARGETS)
    adversarial = attack(x, TARGETS)
    with torch.no_grad():
        before, after = attack.objective(x, labels), attack.objective(adversarial, labels)
    assert (after < before - 0.2).all(), (before, after)
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and adversarial.shape == x.shape


def test_non_targeted_optimisation_lowers_the_clean_caption_probability(members: list[Captioner]) -> None:
    x = _images()
    attack = EnsembleAttack(members, targeted=False, iterations=10, lr=0.02)
    labels = attack.member_labels(x)
    adversarial = attack(x)
    with torch.no_grad():
        before, after = attack.objective(x, labels), attack.objective(adversarial, labels)
    assert (after < before).all(), (before, after)


def test_fast_gradient_budgets(members: list[Captioner]) -> None:
    # Images away from 0 and 1, so clipping cannot change the step.
    x = _images(low=0.3, high=0.7)
    fg = EnsembleAttack(members, targeted=True, method="fg", epsilon=2.0)
    step = fg.perturbation(x, TARGETS)
    torch.testing.assert_close(step.flatten(1).norm(dim=1), torch.full((3,), 2.0))
    torch.testing.assert_close(fg(x, TARGETS) - x, step)
    fgs = EnsembleAttack(members, method="fgs", epsilon=0.03)
    step = fgs.perturbation(x)
    torch.testing.assert_close(step.abs().flatten(1).amax(1), torch.full((3,), 0.03))
    torch.testing.assert_close(fgs(x) - x, step)
    # Full-range images: the result is clipped to [0, 1].
    wide = _images()
    for attack in (
        EnsembleAttack(members, method="fgs", epsilon=0.5),
        EnsembleAttack(members, method="fg", epsilon=40.0),
    ):
        out = attack(wide)
        assert out.min() >= 0 and out.max() <= 1


def test_one_member_matches_fg_and_fgsm(members: list[Captioner]) -> None:
    """With one member, eq. 6 is that member's caption NLL: the same direction as FG / FGSM on its loss."""
    x = _images(low=0.2, high=0.8)
    labels = caption_labels(TARGETS, VOCAB.eos_token_id, x.device)
    single = members[:1]
    ours = EnsembleAttack(single, targeted=True, method="fg", epsilon=1.0)(x, TARGETS)
    torch.testing.assert_close(ours, FG(1.0, targeted=True)(single[0], x, labels), atol=1e-5, rtol=0)
    ours = EnsembleAttack(single, targeted=True, method="fgs", epsilon=0.02)(x, TARGETS)
    torch.testing.assert_close(ours, FGSM(0.02, targeted=True)(single[0], x, labels))


def test_inference_mode_grads_and_modes(members: list[Captioner]) -> None:
    members[0].train()
    x = _images()
    with torch.inference_mode():
        optimized = EnsembleAttack(members, targeted=True, iterations=2)(x, TARGETS)
        fast = EnsembleAttack(members, method="fgs", epsilon=0.05)(x)
    for out in (optimized, fast):
        assert out.shape == x.shape and not out.requires_grad
        assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(optimized, x)
    assert all(p.grad is None for m in members for p in m.parameters())
    assert members[0].training and not members[1].training
