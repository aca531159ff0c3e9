"""Targeted ensemble objectives that must hold on every member (``sum_loglik``, ``sum_margin``) beside Liu et al.
2017's eq. 6 mixture, on constructed members: tiny GRU captioners trained in a second on a three-colour task.

Member ``A`` says caption ``k`` of a colour-``k`` image; member ``P`` (permuted) says caption ``k + 1``. Targeting
caption ``k + 1`` on a colour-``k`` image, ``P`` is fooled before the attack starts while ``A`` is not: eq. 6's mixture
is already low (``-log(0.5 * 1 + 0.5 * 0) = log 2``), the sums are not. That is the failure mode by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.toy_captioner import ToyCaptioner

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from lightning_app.cli import main
from modules.attacks import Optimization
from modules.captioners import Captioner
from modules.transfer_study import TransferStudyConfig
from modules.victims.captioner import CaptionObjective, caption_ensemble, caption_labels, greedy_ids
from modules.victims.ensemble import ENSEMBLE_OBJECTIVES, EnsembleObjective, SumEnsembleObjective

VOCAB = VocabInfo(12, 0, 1, 2)
SIZE = 16
COLOURS = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8]])
CAPTIONS = [[5, 8], [6, 9], [7, 10]]  # caption k belongs to colour k


def _images(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Noisy flat images of colours 0, 1, 2, 0, ... Shape: ``(n, 3, SIZE, SIZE)``."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 3
    x = COLOURS[classes].view(n, 3, 1, 1) + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return x.clamp(0, 1), classes.tolist()


def _train(seed: int, hidden: int, shift: int) -> Captioner:
    """A toy captioner taught to say caption ``k + shift`` of a colour-``k`` image (150 full-batch Adam steps)."""
    torch.manual_seed(seed)
    model = ToyCaptioner(VOCAB, SIZE, hidden)
    x, classes = _images(48, seed)
    labels = caption_labels([CAPTIONS[(c + shift) % 3] for c in classes], VOCAB.eos_token_id, "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        model(x, labels).loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def members() -> dict[str, Captioner]:
    """``A`` and ``B``: the colour task at two seeds and widths; ``P``: the permuted task."""
    return {"A": _train(0, 16, 0), "B": _train(1, 24, 0), "P": _train(2, 16, 1)}


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, list[list[int]]]:
    """Six test images and, per image, the next colour's caption as target."""
    x, classes = _images(6, 99)
    return x, [CAPTIONS[(c + 1) % 3] for c in classes]


def test_the_members_learnt_their_tasks(members: dict[str, Captioner], task: tuple) -> None:
    x, targets = task
    assert greedy_ids(members["A"], x, 6) == greedy_ids(members["B"], x, 6) != targets
    assert greedy_ids(members["P"], x, 6) == targets  # P already says every target


# -- the objectives -------------------------------------------------------------------------------------------------
def test_mixture_is_low_when_one_member_is_fooled_and_the_sums_are_not(members: dict, task: tuple) -> None:
    x, targets = task
    pair = [members["A"], members["P"]]
    with torch.no_grad():
        values = {name: caption_ensemble(pair, x, targets, objective=name).loss(x) for name in ENSEMBLE_OBJECTIVES}
        nll = {k: CaptionObjective.targeting(members[k], targets, loss="log_prob").loss(x) for k in ("A", "P")}
        margin = {k: CaptionObjective.targeting(members[k], targets, loss="logits").loss(x) for k in ("A", "P")}
    # Eq. 6: -log(0.5 P_A + 0.5 P_P) with P_P ~ 1, P_A ~ 0: log 2, though A does not say the target at all.
    assert torch.all((values["mixture"] - math.log(2)).abs() < 0.02), values["mixture"]
    assert torch.all(nll["A"] > 5.0) and torch.all(nll["P"] < 0.02)
    # The sums keep A's whole term: the plain sum of the members' losses.
    torch.testing.assert_close(values["sum_loglik"], nll["A"] + nll["P"])
    torch.testing.assert_close(values["sum_margin"], margin["A"] + margin["P"])
    assert torch.all(values["sum_loglik"] > 5.0)
    # P sits at its floor (-kappa per target word and the end token); A's margin is positive.
    torch.testing.assert_close(margin["P"], torch.full((6,), -3.0))
    assert torch.all(margin["A"] > 0) and torch.all(values["sum_margin"] > 0)


def test_a_member_fooled_by_kappa_gives_no_gradient(members: dict, task: tuple) -> None:
    x, targets = task
    pair = [members["A"], members["P"]]
    objective = caption_ensemble(pair, x, targets, objective="sum_margin", margin=1.0)
    assert isinstance(objective, SumEnsembleObjective) and objective.objective == "sum_margin"

    def gradient(fn: object) -> torch.Tensor:
        image = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(image).sum(), [image])  # type: ignore[operator]
        return grad

    other, fooled = objective.members  # A, then P
    assert torch.count_nonzero(gradient(fooled.loss)) == 0  # every margin of P is below -kappa: clamped
    assert torch.count_nonzero(gradient(other.loss)) > 0
    torch.testing.assert_close(gradient(objective.loss), gradient(other.loss))
    # The log-likelihood sum has no floor: P still pulls (towards an even surer target).
    loglik = caption_ensemble(pair, x, targets, objective="sum_loglik")
    assert torch.count_nonzero(gradient(lambda im: -loglik.members[1].log_likelihood(im))) > 0


def test_weights_scale_the_member_terms(members: dict, task: tuple) -> None:
    x, targets = task
    pair = [members["A"], members["B"]]
    with torch.no_grad():
        plain = caption_ensemble(pair, x, targets, objective="sum_loglik").member_losses(x)  # type: ignore[attr-defined]
        weighted = caption_ensemble(pair, x, targets, weights=[1, 3], objective="sum_loglik")
        assert weighted.member_weights.tolist() == [0.5, 1.5]  # type: ignore[attr-defined]
        torch.testing.assert_close(weighted.loss(x), 0.5 * plain[0] + 1.5 * plain[1])


def test_success_needs_every_member(members: dict, task: tuple) -> None:
    x, targets = task
    for name in ENSEMBLE_OBJECTIVES:
        mixed = caption_ensemble([members["A"], members["P"]], x, targets, objective=name)
        assert mixed.success(x).tolist() == [False] * 6  # P says the target, A does not
        assert mixed.members[1].success(x).tolist() == [True] * 6
    own = greedy_ids(members["A"], x, 6)  # A and B both say their own captions
    both = caption_ensemble([members["A"], members["B"]], x, own, objective="sum_margin")
    assert both.success(x).tolist() == [True] * 6
    loss, checked = both.loss_and_success(x)
    assert checked is not None and checked.tolist() == [True] * 6 and loss.shape == (6,)
    _, checked = caption_ensemble([members["A"], members["P"]], x, targets, objective="sum_margin").loss_and_success(x)
    assert checked is not None and checked.tolist() == [False] * 6


# -- attacks --------------------------------------------------------------------------------------------------------
def test_sum_margin_attack_reaches_the_target_on_two_members(members: dict, task: tuple) -> None:
    x, targets = task
    objective = caption_ensemble([members["A"], members["B"]], x, targets, objective="sum_margin")
    result = Optimization(iterations=60, lr=0.05)(objective, x)
    assert result.success is not None and result.success.tolist() == [True] * 6
    for member in (members["A"], members["B"]):
        assert greedy_ids(member, result.adversarial, 6) == targets


def test_the_sums_fool_both_members_where_the_mixture_stops_at_the_easy_one(members: dict, task: tuple) -> None:
    """By construction, A and P pull the image towards different colours; the mixture starts satisfied by P."""
    x, targets = task
    pair = [members["A"], members["P"]]
    hits = {}
    for name in ENSEMBLE_OBJECTIVES:
        result = Optimization(iterations=100, lr=0.05)(caption_ensemble(pair, x, targets, objective=name), x)
        assert result.success is not None
        hits[name] = int(result.success.sum())
    assert hits["sum_margin"] == hits["sum_loglik"] == 6
    assert hits["mixture"] < 6, hits


# -- early stop on success -----------------------------------------------------------------------------------------
def test_stop_on_success_keeps_each_images_first_successful_iterate(members: dict, task: tuple) -> None:
    """Each image stops at the first iterate where every member's teacher-forced top-1 words are the target: the result
    is what a plain run of exactly that many iterations gives for that image, and every member says the target."""
    x, targets = task
    pair = [members["A"], members["B"]]
    stopped = Optimization(iterations=60, lr=0.05, stop_on_success=True)(
        caption_ensemble(pair, x, targets, objective="sum_margin"), x
    )
    assert stopped.success is not None and stopped.success.tolist() == [True] * 6
    for member in pair:
        assert greedy_ids(member, stopped.adversarial, 6) == targets
    steps = stopped.iterations.tolist()
    assert all(0 < k < 60 for k in steps), steps  # none needed the whole budget
    for i, k in enumerate(steps):
        one = caption_ensemble(pair, x[i : i + 1], targets[i : i + 1], objective="sum_margin")
        plain = Optimization(iterations=k, lr=0.05)(one, x[i : i + 1])
        torch.testing.assert_close(stopped.adversarial[i : i + 1], plain.adversarial, atol=1e-5, rtol=0)
        # One step fewer is not yet a success on both members (the stop is the first success).
        if k > 1:
            earlier = Optimization(iterations=k - 1, lr=0.05)(one, x[i : i + 1]).adversarial
            _, checked = one.loss_and_success(earlier)
            assert checked is not None and not bool(checked[0])
    # Running on past the success (no stop) spends more distortion for the same captions.
    full = Optimization(iterations=60, lr=0.05)(caption_ensemble(pair, x, targets, objective="sum_margin"), x)
    assert float(stopped.l2.mean()) < float(full.l2.mean())


def test_stop_on_success_at_once_and_without_a_check(members: dict, task: tuple) -> None:
    x, targets = task
    own = greedy_ids(members["A"], x, 6)  # already every member's caption: success before any step, no distortion
    done = Optimization(iterations=20, lr=0.05, stop_on_success=True)(
        caption_ensemble([members["A"], members["B"]], x, own, objective="sum_margin"), x
    )
    assert done.iterations.tolist() == [0] * 6 and done.success is not None and done.success.all()
    torch.testing.assert_close(done.adversarial, x, atol=1e-5, rtol=0)  # the tanh map's round trip, no step
    # The mixture has no free check (its loss is no member's): every image runs every iteration, as without the stop.
    mixture = caption_ensemble([members["A"], members["B"]], x, targets, objective="mixture")
    stopped = Optimization(iterations=5, lr=0.05, stop_on_success=True)(mixture, x)
    plain = Optimization(iterations=5, lr=0.05)(mixture, x)
    assert stopped.iterations.tolist() == [5] * 6
    torch.testing.assert_close(stopped.adversarial, plain.adversarial)


# -- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "average"}, "ensemble objective must be one of mixture, sum_loglik, sum_margin, got 'average'"),
        ({"objective": "sum_margin", "targets": None}, "the sum_margin ensemble objective is targeted only"),
        ({"objective": "sum_margin", "margin": 0.0}, r"ensemble margin \(kappa\) must be a number > 0, got 0.0"),
    ],
)
def test_bad_objective_options_are_named(members: dict, task: tuple, kwargs: dict, message: str) -> None:
    x, targets = task
    options = {"targets": targets, **kwargs}
    with pytest.raises(RobucapError, match=message):
        caption_ensemble([members["A"], members["B"]], x, **options)


def test_sum_objectives_refuse_what_they_cannot_sum(members: dict, task: tuple) -> None:
    x, targets = task
    log_prob = [CaptionObjective.targeting(members[k], targets, loss="log_prob") for k in ("A", "B")]
    with pytest.raises(RobucapError, match="must be one of sum_loglik, sum_margin, got 'mixture'"):
        SumEnsembleObjective(log_prob, objective="mixture")
    with pytest.raises(RobucapError, match=r"sum_margin: ensemble member 0 \(CaptionObjective\) has no margin loss"):
        SumEnsembleObjective(log_prob, objective="sum_margin")
    own = [CaptionObjective.own_captions(members[k], x) for k in ("A", "B")]
    with pytest.raises(RobucapError, match="sum_margin ensemble objective is targeted only"):
        SumEnsembleObjective(own, objective="sum_margin")
    assert isinstance(caption_ensemble([members["A"]], x, targets), EnsembleObjective)  # the default stays eq. 6
    assert caption_ensemble([members["A"]], x, targets).objective == "mixture"


def test_transfer_study_option() -> None:
    assert TransferStudyConfig().ensemble_objective == "sum_margin"
    with pytest.raises(RobucapError, match="transfer study ensemble_objective must be one of mixture, sum_loglik"):
        TransferStudyConfig(ensemble_objective="mean")  # type: ignore[arg-type]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error: ") and "\n" not in err
    return err.removeprefix("robucap: error: ")


def test_cli_objective_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["attack", "ensemble", "--ckpt", "a.ckpt", "b.ckpt", "--out", str(tmp_path / "o")]
    assert _cli_error([*base, "--objective", "sum_margin"], capsys) == (
        "--objective sum_margin needs --targeted (a margin towards a target caption); use mixture or sum_loglik"
    )
    message = _cli_error([*base, "--targeted", "--objective", "sum_margin", "--margin", "-1"], capsys)
    assert message == "--margin (kappa) must be a number > 0, got -1.0"
    assert "objective" in _cli_error([*base, "--objective", "average"], capsys)


def test_cli_records_the_objective_and_the_member_hit(
    trained_checkpoint: Path, distinct_checkpoint: Path, shapes_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "targeted"
    # Members: the checkpoint that tells the images apart (targets come from its captions), twice.
    ckpts = [str(distinct_checkpoint), str(distinct_checkpoint), str(trained_checkpoint)]
    args = ["attack", "ensemble", "--ckpt", *ckpts, "--held_out", "2", "--targeted", "--data_root",
            str(shapes_root), "--images", "3", "--iterations", "3", "--lr", "0.05", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    block = json.loads((out / "results.json").read_text())["ensemble"]
    assert (block["objective"], block["margin"], block["distance_weight"]) == ("sum_margin", 1.0, 0.0)
    rows = block["models"]
    # The same checkpoint twice: every image it is fooled on is fooled on both members.
    assert block["on_members"]["target_hit"] == pytest.approx(rows[0]["target_rate"]) == rows[1]["target_rate"]
    assert block["on_held_out"] == {"target_hit": rows[2]["target_rate"]}
