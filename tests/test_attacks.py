"""Budgeted attacks (FGSM, FGSM with random start, PGD, FG) on a captioner objective: formulas, budgets, results,
side effects, grad modes and bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.attacks import ATTACKS, FG, FGSM, PGD, Attack, BudgetAttack, Optimization, ShowAndFool, build_attack
from modules.captioners import Captioner, build_captioner, caption_loss
from modules.victims import CaptionObjective

IMAGE_SIZE = 32
VOCAB = VocabInfo(40, 0, 1, 2)
EPS = 0.05  # Rashid & Rivas's (2024) epsilon in [0, 1] pixel units
FG_EPS = 1.0  # an L2 budget: RMS change 1 / sqrt(3 * 32 * 32) = 0.018 per value

# name -> attack with few steps (the tiny model needs no more to show each property).
MAKERS: dict[str, Callable[[], Attack]] = {
    "fgsm": lambda: FGSM(EPS),
    "fgsm_rs": lambda: FGSM(EPS, random_start=True),
    "pgd": lambda: PGD(EPS, steps=3),
    "fg": lambda: FG(FG_EPS),
}
# Attacks without random noise: their output is a function of the image alone.
DETERMINISTIC: dict[str, Callable[[], Attack]] = {
    "fgsm": lambda: FGSM(EPS),
    "pgd_no_rs": lambda: PGD(EPS, steps=3, random_start=False),
    "fg": lambda: FG(FG_EPS),
}


@pytest.fixture(scope="module")
def base_captioner() -> Captioner:
    torch.manual_seed(0)
    return build_captioner("vit_gpt2", VOCAB, IMAGE_SIZE)


@pytest.fixture
def captioner(base_captioner: Captioner) -> Captioner:
    """A private copy in eval mode, so a test that changes modes, grads or requires_grad cannot leak into another."""
    return copy.deepcopy(base_captioner).eval()


def make_batch(batch_size: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and random captions with some -100 padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    labels = torch.randint(3, VOCAB.vocab_size, (batch_size, 8), generator=gen)
    labels[0, 5:] = -100
    if batch_size > 2:
        labels[2, 3:] = -100
    return x, labels


def per_image_loss(captioner: Captioner, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy per image, in eval mode, without gradients. Shape: ``(B,)``."""
    with torch.no_grad():
        return caption_loss(captioner.eval()(x, labels).logits, labels, reduction="none")


def adversarial(
    attack: Attack, captioner: Captioner, x: torch.Tensor, labels: torch.Tensor, targeted: bool = False
) -> torch.Tensor:
    """The attack's images on the caption cross-entropy objective (untargeted: away from ``labels``)."""
    return attack(CaptionObjective(captioner, labels, targeted=targeted), x).adversarial


def run_seeded(
    attack: Attack, captioner: Captioner, x: torch.Tensor, labels: torch.Tensor, targeted: bool = False
) -> torch.Tensor:
    torch.manual_seed(123)  # the same random start for every call
    return adversarial(attack, captioner, x, labels, targeted)


# ---------------------------------------------------------------------------------------------------------------------
# Formulas and effect


def test_fgsm_equals_the_formula(captioner: Captioner) -> None:
    x, labels = make_batch()
    # Independent gradient: per-image mean cross-entropy written out by hand, summed over the batch.
    xg = x.clone().requires_grad_(True)
    logits = captioner.eval()(xg, labels).logits
    losses = [F.cross_entropy(logits[i][labels[i] != -100], labels[i][labels[i] != -100]) for i in range(len(x))]
    (grad,) = torch.autograd.grad(torch.stack(losses).sum(), [xg])
    expected = torch.clamp(x + EPS * grad.sign(), 0, 1)
    expected_targeted = torch.clamp(x - EPS * grad.sign(), 0, 1)

    assert torch.equal(adversarial(FGSM(EPS), captioner, x, labels), expected)
    assert torch.equal(adversarial(FGSM(EPS), captioner, x, labels, targeted=True), expected_targeted)


def test_untargeted_attacks_raise_the_reference_loss(captioner: Captioner) -> None:
    x, labels = make_batch()
    clean = per_image_loss(captioner, x, labels)
    for name, make in MAKERS.items():
        adv = per_image_loss(captioner, run_seeded(make(), captioner, x, labels), labels)
        assert adv.mean() > clean.mean(), name


def test_targeted_attacks_lower_the_target_loss(captioner: Captioner) -> None:
    x, _ = make_batch()
    _, target = make_batch(seed=7)
    clean = per_image_loss(captioner, x, target)
    for name, make in MAKERS.items():
        adv = per_image_loss(captioner, run_seeded(make(), captioner, x, target, targeted=True), target)
        assert adv.mean() < clean.mean(), name


def test_pgd_reaches_at_least_fgsm_loss(captioner: Captioner) -> None:
    x, labels = make_batch()
    fgsm = per_image_loss(captioner, adversarial(FGSM(EPS), captioner, x, labels), labels)
    pgd = per_image_loss(captioner, run_seeded(PGD(EPS, steps=10), captioner, x, labels), labels)
    assert pgd.mean() >= fgsm.mean()


# ---------------------------------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("name", ["fgsm", "fgsm_rs", "pgd"])
def test_linf_attacks_stay_in_budget_and_range(captioner: Captioner, name: str) -> None:
    x, labels = make_batch()
    adv = run_seeded(MAKERS[name](), captioner, x, labels)
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_pgd_projects_even_with_huge_steps(captioner: Captioner) -> None:
    x, labels = make_batch()
    adv = run_seeded(PGD(EPS, steps=2, step_size=1.0), captioner, x, labels)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


def test_fg_uses_the_l2_budget_per_image(captioner: Captioner) -> None:
    x, labels = make_batch()
    adv = adversarial(FG(FG_EPS), captioner, x, labels)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= FG_EPS + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1
    # Away from the [0, 1] edges nothing is clipped, so each image moves by exactly epsilon in L2.
    mid = torch.full_like(x, 0.5)
    norms = (adversarial(FG(FG_EPS), captioner, mid, labels) - mid).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, FG_EPS))


def test_zero_epsilon_returns_the_images(captioner: Captioner) -> None:
    x, labels = make_batch()
    budgeted = ["fgsm", "fgsm_rs", "fgs", "pgd", "fg"]
    assert set(ATTACKS) - set(budgeted) == {"optimization", "show_and_fool", "dag"}  # no budget, nothing to zero
    for name in budgeted:
        attack = build_attack(name, 0.0)
        assert isinstance(attack, BudgetAttack), name
        result = attack(CaptionObjective(captioner, labels), x)
        assert torch.equal(result.adversarial, x) and result.adversarial is not x, name
        assert result.iterations.tolist() == [0] * len(x) and not result.linf.any() and not result.l2.any(), name


def test_the_result_measures_each_image(captioner: Captioner) -> None:
    x, labels = make_batch()
    torch.manual_seed(123)
    result = PGD(EPS, steps=3)(CaptionObjective(captioner, labels), x)
    delta = (result.adversarial - x).flatten(1)
    assert result.iterations.tolist() == [3] * len(x)
    torch.testing.assert_close(result.linf, delta.abs().amax(1))
    torch.testing.assert_close(result.l2, delta.norm(dim=1))
    assert result.success is None  # an untargeted caption objective has no finish line
    # Targeted, success is whether the greedy caption is the target: a random 8-token target is never reached.
    targeted = FGSM(EPS)(CaptionObjective(captioner, labels, targeted=True), x)
    assert targeted.success is not None and targeted.success.dtype == torch.bool and targeted.success.shape == (4,)
    assert not targeted.success.any()


# ---------------------------------------------------------------------------------------------------------------------
# Side effects, grad modes, frozen parts, batch independence


@pytest.mark.parametrize("name", list(MAKERS))
def test_attack_leaves_modes_grads_and_parameters_alone(captioner: Captioner, name: str) -> None:
    x, labels = make_batch(batch_size=2)
    params = list(captioner.parameters())
    before = [p.detach().clone() for p in params]
    # Half the parameters with an existing gradient (as in the middle of gradient accumulation), half without.
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 else None
    grads = [None if p.grad is None else p.grad.clone() for p in params]

    for training in (True, False):
        captioner.train(training)
        captioner.encoder.train(not training)  # a mixed state must come back exactly, submodule by submodule
        modes = {m: m.training for m in captioner.modules()}
        run_seeded(MAKERS[name](), captioner, x, labels)
        assert {m: m.training for m in captioner.modules()} == modes

    for p, g in zip(params, grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_attack_works_under_disabled_autograd(
    captioner: Captioner, name: str, context: Callable[[], AbstractContextManager[object]]
) -> None:
    x, labels = make_batch(batch_size=2)
    outside = run_seeded(MAKERS[name](), captioner, x, labels)
    with context():
        # Images made under inference_mode are inference tensors, as in a Lightning validation step.
        x_in, labels_in = x.clone(), labels.clone()
        inside = run_seeded(MAKERS[name](), captioner, x_in, labels_in)
    assert not torch.equal(inside, x)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_attack_reaches_the_input_through_a_frozen_encoder(captioner: Captioner) -> None:
    captioner.encoder.requires_grad_(False)
    x, labels = make_batch(batch_size=2)
    adv = adversarial(FGSM(EPS), captioner, x, labels)
    # A zero gradient would leave x unchanged (sign(0) = 0): most pixels must move by the full epsilon.
    assert ((adv - x).abs() > EPS / 2).float().mean() > 0.5
    assert not any(p.requires_grad for p in captioner.encoder.parameters())


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_an_image_does_not_depend_on_its_batch(captioner: Captioner, name: str) -> None:
    x, labels = make_batch(batch_size=2)
    attack = DETERMINISTIC[name]()
    together = adversarial(attack, captioner, x, labels)
    alone = torch.cat([adversarial(attack, captioner, x[i : i + 1], labels[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Factory and bad input


def test_build_attack_names() -> None:
    assert set(ATTACKS) == {"fgsm", "fgsm_rs", "fgs", "pgd", "fg", "optimization", "show_and_fool", "dag"}
    plain, rs = build_attack("fgsm", 0.1), build_attack("FGSM-RS", 0.1)
    assert type(plain) is FGSM and not plain.random_start
    assert type(rs) is FGSM and rs.random_start
    assert type(build_attack("fgs", 0.1)) is FGSM and not build_attack("fgs", 0.1).random_start
    pgd = build_attack("pgd", 0.03, steps=5)
    assert isinstance(pgd, PGD) and pgd.steps == 5
    assert pgd.step_size == pytest.approx(2.5 * 0.03 / 5)
    assert isinstance(build_attack("fg", 2.0), FG)
    assert "PGD(use_eval_mode=True, epsilon=0.03" in repr(pgd)
    sf = build_attack("show-and-fool", iterations=7, search_rounds=2)
    assert isinstance(sf, ShowAndFool) and sf.iterations == 7 and sf.search_rounds == 2
    opt = build_attack("optimization", iterations=4, lr=0.1)
    assert isinstance(opt, Optimization) and opt.iterations == 4 and opt.lr == 0.1


@pytest.mark.parametrize("epsilon", [-0.01, 1.5, float("nan"), True, "0.1"])
def test_linf_epsilon_out_of_range(epsilon: float) -> None:
    for make in (lambda: FGSM(epsilon), lambda: PGD(epsilon), lambda: build_attack("fgsm_rs", epsilon)):
        with pytest.raises(RobucapError, match=r"epsilon must be in \[0, 1\]"):
            make()


def test_bad_options() -> None:
    with pytest.raises(RobucapError, match="PGD steps must be an integer >= 1, got 0"):
        PGD(0.1, steps=0)
    with pytest.raises(RobucapError, match="step_size must be a number > 0"):
        PGD(0.1, step_size=0.0)
    with pytest.raises(RobucapError, match="step_size must be a number > 0"):
        FGSM(0.1, random_start=True, step_size=-1.0)
    with pytest.raises(RobucapError, match="only used with random_start"):
        FGSM(0.1, step_size=0.1)
    with pytest.raises(RobucapError, match="FG epsilon is an L2 budget"):
        FG(-1.0)
    with pytest.raises(RobucapError, match=r"unknown attack 'cw'; expected one of \[.*'fgsm_rs', .*'pgd'"):
        build_attack("cw", 0.1)
    # The direction belongs to the objective now, not to the attack.
    with pytest.raises(RobucapError, match="attack 'pgd' has no option 'targeted'"):
        build_attack("pgd", 0.1, targeted=True)
    with pytest.raises(RobucapError, match="attack 'fgsm' needs epsilon"):
        build_attack("fgsm")
    with pytest.raises(RobucapError, match="attack 'show_and_fool' has no budget"):
        build_attack("show_and_fool", 0.1)
    with pytest.raises(RobucapError, match="Show-and-Fool iterations must be an integer >= 1"):
        build_attack("show_and_fool", iterations=0)
    with pytest.raises(RobucapError, match="distance_weight"):
        build_attack("optimization", distance_weight=-1.0)
    with pytest.raises(RobucapError, match="attack 'pgd' has no option 'iterations'"):
        build_attack("pgd", 0.1, iterations=3)
    with pytest.raises(RobucapError, match="attack 'fgsm_rs' has no option 'random_start'"):
        build_attack("fgsm_rs", 0.1, random_start=False)


def test_fg_rejects_budgets_beyond_the_image_cube(captioner: Captioner) -> None:
    x, labels = make_batch(batch_size=1)
    adversarial(FG(55.0), captioner, x, labels)  # sqrt(3 * 32 * 32) = 55.4: allowed
    with pytest.raises(RobucapError, match=r"exceeds sqrt\(3\*32\*32\) = 55.4"):
        adversarial(FG(8 * 255.0), captioner, x, labels)


def test_attack_rejects_mismatched_shapes(captioner: Captioner) -> None:
    x, labels = make_batch(batch_size=2)
    with pytest.raises(RobucapError, match=r"FGSM expects pixel_values \(1, C, H, W\) for an objective built for 1"):
        FGSM(EPS)(CaptionObjective(captioner, labels[:1]), x)
    with pytest.raises(RobucapError, match=r"caption labels must have shape \(B, T\)"):
        CaptionObjective(captioner, labels[0])
