"""Show-and-Fool (Chen et al. 2018): losses, tanh box, per-row Adam, the c search, batching, targets and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.errors import RobucapError
from datamodules.tokenizer import build_word_tokenizer
from modules.attacks import ShowAndFool, build_attack
from modules.attacks.protocol import Objective
from modules.attacks.tanh_box import RowAdam, from_tanh_space, to_tanh_space
from modules.attacks.targets import choose_targets, content_words, keyword_ids, target_caption_ids
from modules.captioning import CaptioningModule
from modules.victims.captioner import (
    CaptionObjective,
    KeywordObjective,
    caption_ids,
    keyword_loss,
    logits_loss,
    sequence_nll,
)


@pytest.fixture(scope="module")
def trained(trained_checkpoint: Path) -> CaptioningModule:
    return CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True).eval()


@pytest.fixture(scope="module")
def images(trained: CaptioningModule) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=gen)


# -- losses ------------------------------------------------------------------------------------------------------------
def test_logits_loss_stops_contributing_gradient_once_the_margin_is_met() -> None:
    # Position 0: target (id 1) leads by 3 > margin 1 -> constant -1, no gradient.
    # Position 1: target (id 2) trails id 0 by 0.5 -> term 0.5, gradient +1 on id 0 and -1 on id 2.
    logits = torch.tensor([[[0.0, 3.0, 0.0], [1.0, 0.0, 0.5]]], requires_grad=True)
    labels = torch.tensor([[1, 2]])
    loss = logits_loss(logits, labels, margin=1.0)
    assert loss.item() == pytest.approx(-1.0 + 0.5)
    (grad,) = torch.autograd.grad(loss.sum(), [logits])
    assert torch.equal(grad[0, 0], torch.zeros(3))
    assert grad[0, 1].tolist() == [1.0, 0.0, -1.0]


def test_logits_loss_within_the_margin_still_pushes_and_padding_is_ignored() -> None:
    # Target leads by 0.4 < margin 1: term -0.4, still a gradient; the padded position adds nothing.
    logits = torch.tensor([[[0.0, 0.4, 0.0], [9.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[1, -100]])
    loss = logits_loss(logits, labels, margin=1.0)
    assert loss.item() == pytest.approx(-0.4)
    (grad,) = torch.autograd.grad(loss.sum(), [logits])
    assert grad[0, 0].abs().sum() > 0 and torch.equal(grad[0, 1], torch.zeros(3))


def test_sequence_nll_is_the_summed_negative_log_likelihood() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([-(logp[0, 0, 1] + logp[0, 1, 2]), -(logp[1, 0, 0] + logp[1, 1, 4] + logp[1, 2, 3])])
    assert torch.allclose(sequence_nll(logits, labels), expected, atol=1e-6)


def test_keyword_loss_takes_each_keywords_best_position() -> None:
    # Keyword 3 trails by 2 at position 0 and by 0.5 at position 1: min -> 0.5.
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]])
    loss = keyword_loss(logits, torch.tensor([[True, True]]), torch.tensor([[3]]), torch.tensor([[True]]), 1.0, 1e4)
    assert loss.item() == pytest.approx(0.5)


def test_gate_masks_positions_where_another_keyword_is_top1() -> None:
    # Keywords 1 and 2. Position 0: keyword 1 is top-1, keyword 2 trails it by 0.1. Position 1: keyword 2 trails
    # id 0 by 3. Without the gate keyword 2 would pick position 0 (0.1) and collide with keyword 1.
    logits = torch.tensor([[[0.0, 5.0, 4.9], [3.0, 0.0, 0.0]]])
    positions = torch.tensor([[True, True]])
    keywords = torch.tensor([[1, 2]])
    mask = torch.tensor([[True, True]])
    gated = keyword_loss(logits, positions, keywords, mask, margin=1.0, gate_value=1e4)
    # keyword 1: min(-0.1 at position 0, 3 at position 1) = -0.1; keyword 2: position 0 gated -> 3 at position 1.
    assert gated.item() == pytest.approx(-0.1 + 3.0, abs=1e-5)
    # Same logits, only keyword 2 asked for: nothing collides, position 0 (gap 0.1) wins.
    alone = keyword_loss(logits, positions, torch.tensor([[2, 0]]), torch.tensor([[True, False]]), 1.0, 1e4)
    assert alone.item() == pytest.approx(0.1, abs=1e-5)


def test_keyword_loss_ignores_positions_past_the_caption() -> None:
    logits = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    loss = keyword_loss(logits, torch.tensor([[True, False]]), torch.tensor([[1]]), torch.tensor([[True]]), 1.0, 1e4)
    assert loss.item() == pytest.approx(2.0)


# -- tanh box and Adam ---------------------------------------------------------------------------------------------
def test_tanh_box_keeps_images_in_the_unit_box_and_starts_at_the_image() -> None:
    x = torch.rand(2, 3, 8, 8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    y = to_tanh_space(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(from_tanh_space(y, torch.zeros_like(y)), x, atol=1e-6)
    for scale in (1.0, 100.0, 1e6):
        out = from_tanh_space(y, scale * torch.randn_like(y))
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_row_adam_matches_torch_adam_and_rows_are_independent() -> None:
    torch.manual_seed(0)
    w = torch.zeros(3, 4)
    reference = torch.zeros(3, 4, requires_grad=True)
    optimizer = torch.optim.Adam([reference], lr=0.01)
    adam = RowAdam(w, lr=0.01)
    grads = [torch.randn(3, 4) for _ in range(5)]
    for g in grads:
        adam.step(g.clone(), torch.arange(3))
        reference.grad = g.clone()
        optimizer.step()
    assert torch.allclose(w, reference.detach(), atol=1e-7)
    # Stepping row 1 alone gives row 1 the same trajectory.
    alone = torch.zeros(3, 4)
    adam_one = RowAdam(alone, lr=0.01)
    for g in grads:
        adam_one.step(g[1:2].clone(), torch.tensor([1]))
    assert torch.allclose(alone[1], w[1], atol=1e-7)
    assert torch.equal(alone[0], torch.zeros(4))


def test_row_adam_with_one_learning_rate_per_row_is_torch_adam_per_row() -> None:
    torch.manual_seed(1)
    rates = torch.tensor([0.005, 0.05, 0.5])
    w = torch.zeros(3, 2, 4)
    adam = RowAdam(w, lr=rates)
    grads = [torch.randn(3, 2, 4) for _ in range(6)]
    for g in grads:
        adam.step(g.clone(), torch.arange(3))
    for row, rate in enumerate(rates.tolist()):
        reference = torch.zeros(2, 4, requires_grad=True)
        optimizer = torch.optim.Adam([reference], lr=rate)
        for g in grads:
            reference.grad = g[row].clone()
            optimizer.step()
        assert torch.allclose(w[row], reference.detach(), atol=1e-6)


class _ReachBrightness(Objective):
    """Every value must reach 0.97 (hinge loss); from 0.2 that is a move of 2.43 in tanh space (-0.69 to 1.74)."""

    module = torch.nn.Identity()

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return (0.97 - images).clamp_min(0).flatten(1).sum(1)

    def loss_and_success(
        self, images: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.loss(images, rows), self.success(images).cpu()

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return images.detach().flatten(1).amin(1) >= 0.97


def test_a_failed_round_raises_the_step_size_not_only_c() -> None:
    """Adam's step does not grow with c: 50 steps of lr 0.005 move w by at most 0.25, far short of the 2.43 needed,
    whatever c is. The paper's fixed rate fails every round; raising the rate after each failed round succeeds."""
    x = torch.full((2, 3, 4, 4), 0.2)
    options = {"iterations": 50, "lr": 0.005, "search_rounds": 4, "abort_early": False}
    fixed = ShowAndFool(lr_growth=1.0, **options)(_ReachBrightness(), x)
    assert not fixed.success.any()
    assert fixed.c.tolist() == [1000.0, 1000.0] and torch.allclose(fixed.lr, torch.full((2,), 0.005))
    grown = ShowAndFool(lr_growth=3.0, **options)(_ReachBrightness(), x)
    assert grown.success.all()
    # Rounds at 0.005, 0.015 and 0.045 fail (w moves at most 50 lr = 2.25 < 2.43); 0.135 succeeds.
    assert torch.allclose(grown.lr, torch.full((2,), 0.135)) and grown.c.tolist() == [1000.0, 1000.0]
    assert grown.adversarial.min() >= 0.97 and grown.adversarial.max() <= 1.0


def test_the_rate_stops_growing_at_the_first_success() -> None:
    x = torch.full((1, 3, 4, 4), 0.2)
    result = ShowAndFool(iterations=50, lr=0.005, search_rounds=6, abort_early=False)(_ReachBrightness(), x)
    # First success in round 4 (c = 1000, lr 0.135); rounds 5 and 6 bisect c at the same rate.
    assert result.success.all() and float(result.lr[0]) == pytest.approx(0.135)
    assert 0 < float(result.c[0]) <= 1000.0


# -- the attack ------------------------------------------------------------------------------------------------------
def caption_target(module: CaptioningModule, ids: list[list[int]]) -> CaptionObjective:
    """Show-and-Fool's targeted-caption objective (eq. 7) on ``module``'s captioner."""
    return CaptionObjective.targeting(module.captioner, ids, loss="logits", max_new_tokens=24)


def test_own_caption_as_target_succeeds_at_once_with_no_distortion(
    trained: CaptioningModule, images: torch.Tensor
) -> None:
    own = caption_ids(trained.captioner.generate(images, max_new_tokens=24), trained.captioner.vocab)
    result = ShowAndFool(iterations=3, search_rounds=1)(caption_target(trained, own), images)
    assert result.success.all()
    assert torch.allclose(result.l2, torch.zeros(4), atol=1e-4)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert result.rounds == 1 and result.c.tolist() == [1.0] * 4


def test_the_c_search_raises_c_until_an_unmet_target_is_generated(distinct_checkpoint: Path) -> None:
    """Another image's caption as target (as in the paper) and a first c too small to reach it: the search must raise
    c (x10 per round) until the generated caption is the target, then bisect down."""
    module = CaptioningModule.load_from_checkpoint(distinct_checkpoint, map_location="cpu", weights_only=True).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    clean = module.caption(images)
    assert clean[0] != clean[1]
    x, target = images[:1], clean[1]
    objective = caption_target(module, [target_caption_ids(module.tokenizer, target)])
    # The paper's search (fixed rate), so that only c can bring the target within reach.
    options = {"iterations": 50, "lr": 0.01, "initial_c": 0.01, "lr_growth": 1.0}

    first_round = ShowAndFool(search_rounds=1, **options)(objective, x)
    assert not first_round.success.any()  # c = 0.01: the distortion term wins, the target is not reached

    result = ShowAndFool(search_rounds=5, **options)(objective, x)
    assert result.success.all() and result.rounds == 5
    assert float(result.c[0]) > 10 * options["initial_c"]  # at least two x10 rounds before the first success
    # Success is the objective's verdict on the generated caption of the returned image, not a teacher-forced guess.
    assert module.caption(result.adversarial) == [target]
    assert float(result.l2[0]) > float(first_round.l2[0]) > 0
    assert int(result.iterations[0]) > options["iterations"]


def test_batched_and_per_image_runs_agree(trained: CaptioningModule, images: torch.Tensor) -> None:
    clean = trained.caption(images)
    targets = choose_targets(clean + ["a red circle", "a large blue square"], seed=1)[: len(clean)]
    ids = [target_caption_ids(trained.tokenizer, t) for t in targets]
    attack = ShowAndFool(iterations=40, search_rounds=2, lr=0.05)
    batched = attack(caption_target(trained, ids), images)
    single = [attack(caption_target(trained, ids[i : i + 1]), images[i : i + 1]) for i in range(len(ids))]
    assert batched.success.tolist() == [bool(s.success[0]) for s in single]
    assert torch.allclose(batched.l2, torch.cat([s.l2 for s in single]), atol=1e-3)
    assert batched.iterations.tolist() == [int(s.iterations[0]) for s in single]
    assert batched.adversarial.min() >= 0 and batched.adversarial.max() <= 1


def test_keyword_mode_runs_and_reports_success_by_inclusion(trained: CaptioningModule, images: torch.Tensor) -> None:
    clean = trained.caption(images)
    own_word = [[content_words(c)[0]] for c in clean]  # already present: success without any change
    objective = KeywordObjective(trained.captioner, [keyword_ids(trained.tokenizer, k) for k in own_word])
    assert objective.moving_target
    result = ShowAndFool(iterations=5, search_rounds=1)(objective, images)
    assert result.success.all()
    assert torch.allclose(result.l2, torch.zeros(4), atol=1e-4)


def test_attack_leaves_parameters_and_mode_alone(trained: CaptioningModule, images: torch.Tensor) -> None:
    trained.train()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    ids = [target_caption_ids(trained.tokenizer, "a red circle")] * 4
    ShowAndFool(iterations=3, search_rounds=1)(caption_target(trained, ids), images)
    assert trained.training and all(p.grad is None for p in trained.parameters())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    trained.eval()


def test_attack_works_under_inference_mode(trained: CaptioningModule, images: torch.Tensor) -> None:
    ids = [target_caption_ids(trained.tokenizer, "a red circle")] * 4
    with torch.inference_mode():
        result = ShowAndFool(iterations=3, search_rounds=1)(caption_target(trained, ids), images)
    assert result.adversarial.shape == images.shape


# -- targets ---------------------------------------------------------------------------------------------------------
def test_choose_targets_follows_the_paper_and_is_seeded() -> None:
    captions = ["a red circle", "a blue square to the left of a green cross", "a red circle", "a small cyan diamond"]
    targets = choose_targets(captions, seed=3)
    assert targets == choose_targets(captions, seed=3)
    for own, target in zip(captions, targets, strict=True):
        assert target in captions and target != own
    keywords = choose_targets(captions, n_keywords=2, seed=3)
    for own, words in zip(captions, keywords, strict=True):
        assert len(words) == 2 and not set(words) & set(own.split())
        assert all(w not in {"a", "the", "of", "to", "left"} for w in words)


def test_content_words_drop_function_words() -> None:
    assert content_words("a large red circle to the left of a small red square") == [
        "large",
        "red",
        "circle",
        "small",
        "square",
    ]


def test_choose_targets_needs_another_image() -> None:
    with pytest.raises(RobucapError, match="at least 2 images"):
        choose_targets(["a red circle"])
    with pytest.raises(RobucapError, match="no other image offers 3 new content words"):
        choose_targets(["a red circle", "a red circle"], n_keywords=3)


# -- errors ----------------------------------------------------------------------------------------------------------
TOKENIZER = build_word_tokenizer(["a red circle", "a blue square to the left of a green cross"])


def test_target_words_outside_the_vocabulary_are_named() -> None:
    with pytest.raises(RobucapError, match=r"outside the captioner's vocabulary: \['purple', 'hexagon'\]"):
        target_caption_ids(TOKENIZER, "a purple hexagon")
    with pytest.raises(RobucapError, match="non-empty sentence"):
        target_caption_ids(TOKENIZER, " ,. ")
    assert target_caption_ids(TOKENIZER, "A red circle.") == TOKENIZER.encode("a red circle", add_special_tokens=False)


def test_keyword_errors() -> None:
    with pytest.raises(RobucapError, match="at least one non-empty keyword"):
        keyword_ids(TOKENIZER, [])
    with pytest.raises(RobucapError, match=r"target keywords \['dog'\] are not words"):
        keyword_ids(TOKENIZER, ["red", "dog"])
    with pytest.raises(RobucapError, match="distinct"):
        keyword_ids(TOKENIZER, ["red", "red"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"initial_c": 0}, "c \\(initial_c\\) must be a number > 0, got 0"),
        ({"initial_c": -1.0}, "c \\(initial_c\\) must be a number > 0"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ({"search_rounds": 0}, "search_rounds must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"reinfer_every": 0}, "reinfer_every must be an integer >= 1"),
        ({"lr_growth": 0.5}, "lr_growth must be a number >= 1, got 0.5"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        ShowAndFool(**options)
    with pytest.raises(RobucapError, match=message):
        build_attack("show_and_fool", **options)


def test_bad_objective_options_are_named(trained: CaptioningModule) -> None:
    ids = [target_caption_ids(trained.tokenizer, "a red circle")]
    with pytest.raises(RobucapError, match="margin must be a number > 0"):
        CaptionObjective.targeting(trained.captioner, ids, loss="logits", margin=-1)
    with pytest.raises(RobucapError, match="loss must be one of \\['cross_entropy', 'log_prob', 'logits'\\]"):
        CaptionObjective.targeting(trained.captioner, ids, loss="hinge")
    labels = CaptionObjective.targeting(trained.captioner, ids).labels
    with pytest.raises(RobucapError, match="the logits loss .* is a targeted loss"):
        CaptionObjective(trained.captioner, labels, loss="logits")
    with pytest.raises(RobucapError, match="gate_value must be a number > 0"):
        KeywordObjective(trained.captioner, [[5]], gate_value=0)
    with pytest.raises(RobucapError, match="needs a Captioner, got CaptioningModule \\(pass module.captioner"):
        KeywordObjective(trained, [[5]])  # type: ignore[arg-type]


def test_bad_call_shapes(trained: CaptioningModule, images: torch.Tensor) -> None:
    attack = ShowAndFool(iterations=1, search_rounds=1)
    with pytest.raises(RobucapError, match=r"ShowAndFool expects pixel_values \(1, C, H, W\)"):
        attack(caption_target(trained, [[5]]), images)
    with pytest.raises(RobucapError, match="the target of image 1 is empty"):
        caption_target(trained, [[5], [], [5], [5]])
    with pytest.raises(RobucapError, match=r"the keyword list of image 0 must be token ids in \[0, "):
        KeywordObjective(trained.captioner, [[10**6]])
    # An objective with no finish line cannot drive the c search.
    untargeted = CaptionObjective(trained.captioner, caption_target(trained, [[5]] * 4).labels)
    with pytest.raises(RobucapError, match="Show-and-Fool needs an objective that defines success"):
        attack(untargeted, images)
