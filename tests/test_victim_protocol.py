"""The attack protocol on a victim that is not a captioner: a toy image classifier defined here, with its own
objective, attacked through the public API (``build_attack``) with no change to any attack file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.attacks import AttackResult, Objective, build_attack
from modules.victims import EnsembleObjective, LikelihoodObjective

SIDE = 8
PIXELS = 3 * SIDE * SIDE


class MeanBrightness(nn.Module):
    """Two classes, "dark" (0) and "bright" (1): logit_1 - logit_0 = mean pixel - 0.5, by construction.

    Every pixel pushes towards "bright" with the same weight, so the sign of the input gradient is known: an attack
    that moves "dark" images towards "bright" must raise every pixel. A dropout layer (a no-op on the decision, as
    its input is constant) lets the test see which mode the attack ran the model in.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(PIXELS, 2)
        self.dropout = nn.Dropout(0.5)
        self.seen_training: list[bool] = []
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[1].fill_(1.0 / PIXELS)
            self.linear.bias.copy_(torch.tensor([0.0, -0.5]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.linear(images.flatten(1)) + self.dropout(torch.zeros(images.shape[0], 2))


class ClassObjective(LikelihoodObjective):
    """Cross-entropy on class labels: untargeted, raise the true class's; targeted, lower the target class's."""

    def __init__(self, model: MeanBrightness, labels: torch.Tensor, targeted: bool = False) -> None:
        self.module = model
        self.labels = labels
        self.targeted = targeted
        self.size = len(labels)

    def _rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.labels if rows is None else self.labels[rows]

    def log_likelihood(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return -F.cross_entropy(self.module(images), self._rows(rows), reduction="none")

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        nll = -self.log_likelihood(images, rows)
        return nll if self.targeted else -nll

    def success(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        predicted = self.module(images).argmax(1)
        wanted = self._rows(rows)
        return predicted.eq(wanted) if self.targeted else predicted.ne(wanted)


def dark_images(n: int = 4) -> torch.Tensor:
    """Images of mean 0.48 (class "dark"), with texture, away from the [0, 1] edges."""
    noise = torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    return 0.48 + noise - noise.mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_fgsm_and_pgd_flip_a_toy_classifier(name: str, targeted: bool) -> None:
    model = MeanBrightness().train()
    x = dark_images()
    labels = torch.ones(4, dtype=torch.long) if targeted else torch.zeros(4, dtype=torch.long)
    objective = ClassObjective(model, labels, targeted=targeted)
    assert model(x).argmax(1).tolist() == [0, 0, 0, 0]
    before = objective.loss(x).detach()
    model.seen_training.clear()

    epsilon = 0.05  # mean 0.48 + 0.05 > 0.5: the budget is enough, and every pixel must move up
    result = build_attack(name, epsilon, **({"steps": 3} if name == "pgd" else {}))(objective, x)

    assert isinstance(result, AttackResult)
    assert model.training and model.dropout.training  # train flags restored, submodules included
    assert model.seen_training and not any(model.seen_training)  # differentiated in eval mode
    assert result.success is not None and result.success.all()
    assert model.eval()(result.adversarial).argmax(1).tolist() == [1, 1, 1, 1]
    assert (objective.loss(result.adversarial) < before).all()
    delta = result.adversarial - x
    assert (delta > 0).all() and delta.abs().max() <= epsilon + 1e-6
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    for field in (result.success, result.iterations, result.linf, result.l2):
        assert field.shape == (4,)
    assert result.iterations.tolist() == [1 if name == "fgsm" else 3] * 4
    torch.testing.assert_close(result.linf, delta.flatten(1).abs().amax(1))


def test_a_budget_too_small_fails_and_says_so() -> None:
    model = MeanBrightness().eval()
    x = dark_images()
    result = build_attack("fgsm", 0.01)(ClassObjective(model, torch.zeros(4, dtype=torch.long)), x)
    assert result.success is not None and not result.success.any()  # 0.48 + 0.01 stays "dark"
    assert model(result.adversarial).argmax(1).tolist() == [0, 0, 0, 0]


def test_an_objective_without_success_gives_none() -> None:
    class LossOnly(Objective):
        def __init__(self, model: MeanBrightness) -> None:
            self.module = model

        def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            return -self.module(images)[:, 0]

    result = build_attack("pgd", 0.05, steps=2)(LossOnly(MeanBrightness()), dark_images())
    assert result.success is None and result.adversarial.shape == (4, 3, SIDE, SIDE)


def test_two_classifiers_make_an_ensemble_with_no_new_code() -> None:
    """Liu et al. 2017's eq. 6 over two classifiers: the optimisation attack moves both to the target class."""
    first, second = MeanBrightness().eval(), MeanBrightness().eval()
    with torch.no_grad():
        second.linear.bias[1] = -0.51  # a slightly harder member
    x = dark_images()
    target = torch.ones(4, dtype=torch.long)
    objective = EnsembleObjective([ClassObjective(first, target, True), ClassObjective(second, target, True)])
    result = build_attack("optimization", iterations=30, lr=0.05)(objective, x)
    assert result.success is not None and result.success.all()
    assert first(result.adversarial).argmax(1).tolist() == [1] * 4 == second(result.adversarial).argmax(1).tolist()
