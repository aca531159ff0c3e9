"""Dense Adversary Generation (Xie et al. 2017) and its dense objectives: segmenter pixels, detector proposals,
captioner content tokens.

Toy segmenters are built here in float64 (so "exactly gamma" is checked to 1e-12): a per-pixel linear classifier
(a 1x1 convolution: each pixel's logits depend on that pixel only, so a fooled pixel, which gets no gradient, can
never come back) and a small convolutional one (pixels interact). The detector is a randomly initialised
torchvision Faster R-CNN with a two-layer backbone, built here (no download).
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from helpers.toy_captioner import ToyCaptioner
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, box_iou

from datamodules.errors import RobucapError
from datamodules.shapes import COLORS, SHAPE_KINDS, SIZES
from datamodules.tokenizer import VocabInfo, build_word_tokenizer
from modules.attacks import build_attack, input_gradient
from modules.attacks.dag import DAG, PAPER_GAMMA, perceptibility
from modules.victims import (
    CaptionObjective,
    DetectorObjective,
    ProposalSettings,
    SegmenterObjective,
    TokenObjective,
    adversarial_permutation,
    caption_labels,
    derangement,
    word_classes,
)
from modules.victims.dense import image_seeds

CLASSES = 4  # background + 3 foreground classes
SIDE = 6


def per_pixel_segmenter() -> nn.Module:
    """A 1x1 convolution: a linear classifier applied to each pixel on its own.

    It picks the nearest of four colour prototypes inside the [0.3, 0.7] cube (``argmax_c k p_c.x - k |p_c|^2 / 2``),
    so every class is reachable from every pixel without leaving [0, 1].
    """
    prototypes = torch.tensor(
        [[0.5, 0.5, 0.5], [0.65, 0.35, 0.35], [0.35, 0.65, 0.35], [0.35, 0.35, 0.65]], dtype=torch.float64
    )
    model = nn.Conv2d(3, CLASSES, kernel_size=1).double()
    with torch.no_grad():
        model.weight.copy_(20.0 * prototypes.view(CLASSES, 3, 1, 1))
        model.bias.copy_(-10.0 * prototypes.pow(2).sum(1))
    return model


def conv_segmenter() -> nn.Module:
    """3x3 convolution, tanh, 1x1 convolution: each pixel's logits depend on its neighbours."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1), nn.Tanh(), nn.Conv2d(8, CLASSES, kernel_size=1)
    ).double()
    with torch.no_grad():
        model[0].weight.mul_(6.0)
    return model


def mid_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Images in [0.3, 0.7], away from the [0, 1] edges (no clipping during a short attack)."""
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.4 + 0.3


class Recording(SegmenterObjective):
    """A segmenter objective that records each image's active-set size after every refresh."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.history: list[dict[int, int]] = []

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        done = super().refresh(images, rows)
        picked = range(self.size) if rows is None else rows.tolist()
        self.history.append({r: int(self.active[r].sum()) for r in picked})
        return done


# ---------------------------------------------------------------------------------------------------------------------
# Adversarial labels


def test_pi_has_no_fixed_point_keeps_the_background_and_is_seeded() -> None:
    for classes in (3, 4, 6, 21):
        for seed in range(40):
            pi = adversarial_permutation(classes, seed, background=0)
            assert sorted(pi.tolist()) == list(range(classes))  # a permutation
            assert pi[0] == 0  # background stays background
            assert not pi[1:].eq(torch.arange(1, classes)).any()  # no fixed point among the foreground classes
            assert torch.equal(pi, adversarial_permutation(classes, seed, background=0))  # seeded
    drawn = {tuple(adversarial_permutation(6, seed).tolist()) for seed in range(40)}
    assert len(drawn) > 10  # random, not one fixed derangement
    assert derangement(2, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    no_background = adversarial_permutation(3, 0, background=None)
    assert not no_background.eq(torch.arange(3)).any()
    with pytest.raises(RobucapError, match="at least 2 foreground classes"):
        adversarial_permutation(2, 0, background=0)


def test_image_seeds() -> None:
    assert image_seeds(10, 3) == [10, 11, 12]
    assert image_seeds([7, 3], 2) == [7, 3]
    with pytest.raises(RobucapError, match="one integer seed per image"):
        image_seeds([1, 2], 3)


# ---------------------------------------------------------------------------------------------------------------------
# The attack on toy segmenters


def test_every_step_moves_the_image_by_exactly_gamma() -> None:
    model, x = conv_segmenter(), mid_images()
    previous, steps_seen = x, 0
    for k in range(1, 5):
        result = DAG(max_iterations=k)(SegmenterObjective.own_predictions(model, x), x)
        moved = result.iterations.eq(k)
        step = (result.adversarial - previous).flatten(1).abs().amax(1)
        torch.testing.assert_close(step[moved], torch.full_like(step[moved], PAPER_GAMMA), rtol=0, atol=1e-12)
        assert not step[~moved].any()  # a finished image does not move
        steps_seen += int(moved.sum())
        previous = result.adversarial
    assert steps_seen >= 4 * 2  # most images took every step


def test_a_target_that_is_already_adversarial_gives_no_gradient() -> None:
    model, x = per_pixel_segmenter(), mid_images(1)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    masks = predicted.clone()
    masks[predicted.eq(0)] = 1  # every pixel a target: background pixels become (misclassified) class-1 pixels
    wrong = predicted.eq(0)[0]
    assert wrong.any() and (~wrong).any()
    objective = SegmenterObjective(model, x, masks)
    objective.refresh(x)
    assert torch.equal(objective.active[0], ~wrong.flatten())  # the misclassified pixels are not active
    gradient, loss = input_gradient(objective, x)
    per_pixel = gradient[0].abs().sum(0)
    assert not per_pixel[wrong].any()  # misclassified pixels: exactly no gradient
    assert per_pixel[~wrong].gt(0).all()
    # The loss is sum over active (f_l - f_l'), by hand.
    logits = model(x)[0].flatten(1)
    index = torch.nonzero(~wrong.flatten()).squeeze(1)
    true = masks[0].flatten()[index]
    adversarial = adversarial_permutation(CLASSES, 0)[true]
    expected = (logits[true, index] - logits[adversarial, index]).sum()
    torch.testing.assert_close(loss[0], expected.detach())


def test_dag_flips_every_target_pixel_and_stops() -> None:
    model, x = per_pixel_segmenter(), mid_images(3)
    objective = SegmenterObjective.own_predictions(model, x)
    targets = objective.target_counts()
    assert targets.gt(0).all() and targets.lt(SIDE * SIDE).all()  # some background pixels are not targets
    result = DAG(gamma=0.01, max_iterations=200)(objective, x)
    assert result.success.all() and result.iterations.lt(200).all() and result.iterations.gt(0).all()
    assert torch.equal(objective.fooled_counts(result.adversarial), targets)
    assert objective.active_counts().eq(0).all()
    with torch.no_grad():
        before, after = model(x).argmax(1), model(result.adversarial).argmax(1)
    foreground = before.ne(0)
    assert after[foreground].ne(before[foreground]).all()
    # Background pixels are no target and, the classifier being per pixel, get no gradient: they never move.
    assert torch.equal(result.adversarial.permute(0, 2, 3, 1)[~foreground], x.permute(0, 2, 3, 1)[~foreground])
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    # Each image took as many steps as it needed: its linf is at most its steps times gamma.
    assert result.linf.le(result.iterations * 0.01 + 1e-12).all()
    torch.testing.assert_close(perceptibility(result.l2, SIDE * SIDE), result.l2 / SIDE)


def test_a_margin_keeps_targets_active_until_the_true_class_is_that_far_below() -> None:
    model, x = per_pixel_segmenter(), mid_images(2)
    paper = SegmenterObjective.own_predictions(model, x)
    strict = SegmenterObjective.own_predictions(model, x, margin=4.0)
    paper.refresh(x), strict.refresh(x)
    assert all(torch.equal(a, b) for a, b in zip(paper.active, strict.active, strict=True))  # clean: top class = true
    result = DAG(gamma=0.01, max_iterations=400)(strict, x)
    assert result.success.all() and strict.active_counts().eq(0).all()
    with torch.no_grad():
        logits = model(result.adversarial).flatten(2)  # (B, C, pixels)
    for i in range(x.shape[0]):
        scores = logits[i][:, strict.pixels[i]].T  # (targets, C)
        true = strict.labels[i].unsqueeze(1)
        gap = scores.gather(1, true).squeeze(1) - scores.scatter(1, true, float("-inf")).amax(1)
        assert gap.le(-4.0).all()  # every target ends at least the margin below the best other class
    # The paper's rule stops as soon as the top class is wrong: fewer steps, and its targets stay closer.
    plain = DAG(gamma=0.01, max_iterations=400)(SegmenterObjective.own_predictions(model, x), x)
    assert plain.success.all() and plain.iterations.lt(result.iterations).all()
    with pytest.raises(RobucapError, match="margin must be a number >= 0"):
        SegmenterObjective.own_predictions(model, x, margin=-1.0)


def test_the_active_set_never_grows_when_fooled_targets_cannot_revert() -> None:
    """The paper's recomputed active set, on the per-pixel classifier where a fooled pixel can never revert."""
    model, x = per_pixel_segmenter(), mid_images(2)
    objective = Recording(model, x, model(x).argmax(1).detach())
    DAG(gamma=0.005, max_iterations=60)(objective, x)
    for row in range(2):
        sizes = [h[row] for h in objective.history if row in h]
        assert sizes[0] > sizes[-1]
        assert all(a >= b for a, b in pairwise(sizes)), sizes


def test_shrink_only_keeps_a_reverted_target_out_and_the_paper_set_takes_it_back() -> None:
    model, x = per_pixel_segmenter(), mid_images(1)
    masks = model(x).argmax(1).detach()
    pixel = int(torch.nonzero(masks[0].flatten().ne(0))[0])
    result = DAG(gamma=0.01, max_iterations=200)(SegmenterObjective(model, x, masks), x)
    fooled = x.clone()
    fooled.view(1, 3, -1)[0, :, pixel] = result.adversarial.view(1, 3, -1)[0, :, pixel]  # only that pixel fooled
    for shrink_only, back in ((False, True), (True, False)):
        objective = SegmenterObjective(model, x, masks, shrink_only=shrink_only)
        objective.refresh(fooled)
        assert not objective.active[0][objective.pixels[0].eq(pixel)].any()
        objective.refresh(x)  # the pixel reverts to its true class
        assert bool(objective.active[0][objective.pixels[0].eq(pixel)].any()) is back


def test_the_active_set_never_grows_with_shrink_only_where_targets_interact() -> None:
    model, x = conv_segmenter(), mid_images(2, seed=4)
    objective = Recording(model, x, model(x).argmax(1).detach(), shrink_only=True)
    DAG(gamma=0.01, max_iterations=40)(objective, x)
    for row in range(2):
        sizes = [h[row] for h in objective.history if row in h]
        assert sizes[0] > sizes[-1] and all(a >= b for a, b in pairwise(sizes)), sizes


def test_batched_and_per_image_runs_give_the_same_perturbation() -> None:
    model, x = conv_segmenter(), mid_images(3, seed=2)
    masks = model(x).argmax(1).detach()
    attack = DAG(gamma=0.01, max_iterations=100)
    together = attack(SegmenterObjective(model, x, masks, seeds=[5, 6, 7]), x)
    alone = [
        attack(SegmenterObjective(model, x[i : i + 1], masks[i : i + 1], seeds=[5 + i]), x[i : i + 1]) for i in range(3)
    ]
    assert len(set(together.iterations.tolist())) > 1  # images left the batch at different iterations
    torch.testing.assert_close(together.adversarial, torch.cat([a.adversarial for a in alone]), rtol=0, atol=1e-12)
    assert together.iterations.tolist() == [int(a.iterations) for a in alone]
    assert together.success.tolist() == [bool(a.success) for a in alone]


# ---------------------------------------------------------------------------------------------------------------------
# Faster R-CNN


def tiny_detector() -> FasterRCNN:
    """Two strided convolutions, one feature map, small anchors; 64 px inputs upsampled to 128 px by the transform.

    The classifier's bias favours class 1 just enough that about half the proposals start classified as class 1.
    """
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
    )
    backbone.out_channels = 16
    model = FasterRCNN(
        backbone,
        num_classes=6,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        min_size=128,
        max_size=128,
        representation_size=32,
    )
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.3)
        model.roi_heads.box_predictor.cls_score.bias[1] += 0.25
    return model.eval()


def detection_batch() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Two images: one with two class-1 objects, one without any object."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    boxes = [torch.tensor([[8.0, 8.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]), torch.zeros(0, 4)]
    return x, boxes, [torch.tensor([1, 1]), torch.zeros(0, dtype=torch.long)]


def test_detector_objective_targets_dense_proposals_near_the_ground_truth() -> None:
    model, (x, boxes, labels) = tiny_detector(), detection_batch()
    with torch.no_grad():
        images, _ = model.transform(list(x))
        default, _ = model.rpn(images, {"0": model.backbone(images.tensors)})
    objective = DetectorObjective(model, x, boxes, labels)
    # Denser than the model's own RPN (NMS 0.7, 1000 proposals), whose settings come back afterwards.
    assert objective.proposal_counts[0] > len(default[0])
    assert model.rpn.nms_thresh == 0.7 and model.rpn.post_nms_top_n() == 1000
    targets = objective.proposals[0]
    assert len(targets) > 0 and objective.target_counts().tolist() == [len(targets), 0]
    # Proposals are in the transform's 128 px coordinates; every target overlaps a 64 px ground-truth box > 0.1.
    assert images.image_sizes[0] == (128, 128)
    assert box_iou(targets / 2, boxes[0]).amax(1).gt(0.1).all()
    assert objective.labels[0].eq(1).all() and objective.adversarial[0].ne(1).all()
    assert objective.object_counts.tolist() == [2, 0]


def test_detector_loss_is_differentiable_proposals_stay_fixed_and_the_active_set_shrinks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, (x, boxes, labels) = tiny_detector(), detection_batch()
    objective = DetectorObjective(model, x, boxes, labels, seeds=[3, 4])
    proposals = [p.clone() for p in objective.proposals]

    def no_new_proposals(*args: object, **kwargs: object) -> None:
        raise AssertionError("the RPN ran again: DAG's targets are the clean image's proposals")

    monkeypatch.setattr(model.rpn, "forward", no_new_proposals)
    objective.refresh(x)
    start = objective.active_counts()
    assert start[0] > 0 and start[1] == 0
    gradient, loss = input_gradient(objective, x)
    assert gradient[0].abs().sum() > 0 and torch.isfinite(gradient).all() and not gradient[1].any()
    result = DAG(gamma=2 / 255, max_iterations=8)(objective, x)
    assert all(torch.equal(a, b) for a, b in zip(proposals, objective.proposals, strict=True))
    assert objective.active_counts()[0] < start[0]
    # The image without objects is skipped and counted: no target, done at once, untouched.
    assert objective.target_counts()[1] == 0 and bool(result.success[1]) and result.iterations.tolist() == [8, 0]
    assert torch.equal(result.adversarial[1], x[1])
    torch.testing.assert_close(result.linf[0], torch.tensor(8 * 2 / 255), rtol=0, atol=1e-6)


def test_reselection_is_a_fresh_selection_on_the_iterate_with_the_same_permutation() -> None:
    model, (x, boxes, labels) = tiny_detector(), detection_batch()
    objective = DetectorObjective(model, x, boxes, labels, seeds=[3, 4], reselect_every=2)
    clean = [p.clone() for p in objective.proposals]
    moved = (x + 0.15 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    objective.refresh(x)  # the clean image's refresh: its targets were just selected
    objective.refresh(moved)  # one step later: not due yet
    assert all(torch.equal(a, b) for a, b in zip(clean, objective.proposals, strict=True))
    assert objective.reselections.tolist() == [0, 0]
    objective.refresh(moved)  # the second step: due, on the iterate
    fresh = DetectorObjective(model, moved, boxes, labels, seeds=[3, 4])
    assert objective.reselections.tolist() == [1, 1]
    assert not torch.equal(objective.proposals[0], clean[0])
    for mine, theirs in ((objective.proposals, fresh.proposals), (objective.labels, fresh.labels),
                         (objective.adversarial, fresh.adversarial)):  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    # Within an iteration the proposals stay fixed: the loss and its gradient never run the RPN.
    before = [p.clone() for p in objective.proposals]
    input_gradient(objective, moved)
    assert all(torch.equal(a, b) for a, b in zip(before, objective.proposals, strict=True))
    with pytest.raises(RobucapError, match="reselect_every must be an integer >= 0, got -1"):
        DetectorObjective(model, x, boxes, labels, reselect_every=-1)


def test_detector_objective_refuses_bad_input() -> None:
    model, (x, boxes, labels) = tiny_detector(), detection_batch()
    with pytest.raises(RobucapError, match="needs a torchvision FasterRCNN"):
        DetectorObjective(nn.Conv2d(3, 3, 1), x, boxes, labels)  # type: ignore[arg-type]
    with pytest.raises(RobucapError, match="classes 1..5"):
        DetectorObjective(model, x, boxes, [torch.tensor([1, 6]), labels[1]])
    with pytest.raises(RobucapError, match="for each of 2 images"):
        DetectorObjective(model, x, boxes[:1], labels[:1])
    with pytest.raises(RobucapError, match="nms_threshold must be in"):
        ProposalSettings(nms_threshold=1.5)
    with pytest.raises(RobucapError, match="max_proposals must be an integer"):
        ProposalSettings(max_proposals=0)


# ---------------------------------------------------------------------------------------------------------------------
# Captioner


SHAPES_CAPTIONS = ["a small red circle above a large blue square", "a large green cross", "the image shows a diamond"]


@pytest.fixture(scope="module")
def shapes_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    extra = [*COLORS, *SHAPE_KINDS, *SIZES]
    return build_word_tokenizer(SHAPES_CAPTIONS, extra_words=extra)


def test_shapes_words_are_permuted_within_their_class(shapes_tokenizer) -> None:  # noqa: ANN001
    classes = word_classes(shapes_tokenizer)
    words = [sorted(shapes_tokenizer.convert_ids_to_tokens(ids)) for ids in classes]
    assert sorted(words) == sorted([sorted(COLORS), sorted(SHAPE_KINDS), sorted(SIZES)])
    captioner = ToyCaptioner(VocabInfo.from_tokenizer(shapes_tokenizer), 16, 8)
    caption = shapes_tokenizer.encode(SHAPES_CAPTIONS[0], add_special_tokens=False)
    template = shapes_tokenizer.encode(SHAPES_CAPTIONS[2], add_special_tokens=False)
    objective = TokenObjective(captioner, shapes_tokenizer, [caption, template, []], seeds=[0, 1, 2])
    assert objective.positions[0].tolist() == [1, 2, 3, 6, 7, 8]  # small red circle, large blue square
    assert objective.positions[1].tolist() == [4]  # "image" and "shows" are template words, no target
    assert objective.target_counts().tolist() == [6, 1, 0]  # an empty caption has no target
    group = {token: k for k, ids in enumerate(classes) for token in ids}
    for true, adversarial in zip(objective.labels[:2], objective.adversarial[:2], strict=True):
        assert all(group[a] == group[t] and a != t for t, a in zip(true.tolist(), adversarial.tolist(), strict=True))
    again = TokenObjective(captioner, shapes_tokenizer, [caption, template, []], seeds=[0, 1, 2])
    assert torch.equal(again.adversarial[0], objective.adversarial[0])


def test_other_vocabularies_permute_content_words_among_content_words() -> None:
    tokenizer = build_word_tokenizer(["a dog on a red sofa", "two cats near the window", "a man rides a horse"])
    (content,) = word_classes(tokenizer)
    words = set(tokenizer.convert_ids_to_tokens(content))
    assert words == {"dog", "red", "sofa", "cats", "window", "man", "rides", "horse"}
    assert word_classes(tokenizer, [["dog", "horse", "cats"], ["red"]]) == [
        sorted(tokenizer.convert_tokens_to_ids(["dog", "horse", "cats"]))
    ]  # a class of one word cannot be permuted


def fitted_toy_captioner(tokenizer, x: torch.Tensor) -> ToyCaptioner:  # noqa: ANN001
    """The toy GRU captioner fitted (a second or so) to say ``SHAPES_CAPTIONS[i]`` for image ``i``."""
    torch.manual_seed(0)
    captioner = ToyCaptioner(VocabInfo.from_tokenizer(tokenizer), x.shape[-1], 32)
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in SHAPES_CAPTIONS]
    labels = caption_labels(ids, tokenizer.eos_token_id, "cpu")
    optimiser = torch.optim.Adam(captioner.parameters(), lr=0.03)
    for _ in range(150):
        optimiser.zero_grad()
        captioner(x, labels).loss.backward()
        optimiser.step()
    return captioner.eval()


def test_dag_flips_a_captioners_content_tokens(shapes_tokenizer) -> None:  # noqa: ANN001
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    captioner = fitted_toy_captioner(shapes_tokenizer, x)
    objective = TokenObjective.greedy(captioner, shapes_tokenizer, x, max_new_tokens=12)
    targets = objective.target_counts()
    assert targets.tolist() == [6, 3, 1]  # the fitted captions' colour, shape and size words
    objective.refresh(x)  # the captioner's own greedy caption: teacher-forced, every target is its top-1 word
    assert torch.equal(objective.active_counts(), targets)
    result = DAG(gamma=0.02, max_iterations=40)(objective, x)
    flipped = objective.fooled_counts(result.adversarial)
    assert flipped.sum() > 0 and flipped.le(targets).all()
    assert torch.equal(result.success, flipped.eq(targets))


# ---------------------------------------------------------------------------------------------------------------------
# Options and bad input


def test_dag_options_and_bad_values() -> None:
    attack = build_attack("dag", gamma=0.01, max_iterations=5)
    assert isinstance(attack, DAG) and attack.gamma == 0.01 and attack.max_iterations == 5
    assert DAG().gamma == pytest.approx(0.5 / 255) and DAG().max_iterations == 150
    for bad in (0, -0.1, float("nan")):
        with pytest.raises(RobucapError, match="gamma must be a number > 0"):
            DAG(gamma=bad)
    for bad in (0, -3):
        with pytest.raises(RobucapError, match="max_iterations must be an integer >= 1"):
            build_attack("dag", max_iterations=bad)
    with pytest.raises(RobucapError, match="no budget"):
        build_attack("dag", 0.1)


def test_dag_needs_an_objective_with_an_active_set(shapes_tokenizer) -> None:  # noqa: ANN001
    captioner = ToyCaptioner(VocabInfo.from_tokenizer(shapes_tokenizer), 16, 8)
    labels = torch.tensor([[4, 5, shapes_tokenizer.eos_token_id]])
    with pytest.raises(RobucapError, match="DAG needs a dense objective"):
        DAG(max_iterations=2)(CaptionObjective(captioner, labels), torch.rand(1, 3, 16, 16))


def test_segmenter_objective_refuses_bad_masks_and_skips_images_without_objects() -> None:
    model, x = per_pixel_segmenter(), mid_images(2)
    with pytest.raises(RobucapError, match="masks must have shape"):
        SegmenterObjective(model, x, torch.zeros(2, SIDE + 1, SIDE, dtype=torch.long))
    with pytest.raises(RobucapError, match="outside the model's 4 classes"):
        SegmenterObjective(model, x, torch.full((2, SIDE, SIDE), 7, dtype=torch.long))
    masks = model(x).argmax(1).detach()
    masks[1] = 0  # all background: no target
    objective = SegmenterObjective(model, x, masks)
    result = DAG(gamma=0.01, max_iterations=3)(objective, x)
    assert objective.target_counts()[1] == 0 and bool(result.success[1]) and result.iterations[1] == 0
    assert torch.equal(result.adversarial[1], x[1])
