"""The dense study's transfer pieces on constructed cases: noise of the same L2, summed r, permuted control, resize."""

from __future__ import annotations

import pytest
import torch

from datamodules.errors import RobucapError
from modules.dense_transfer import noise_like, resize_images, summed_perturbation, transfer_row
from modules.dense_victims_eval import PERMUTATION_DRAWS, permute_rows_columns


def test_noise_has_each_images_l2_norm_and_is_seeded() -> None:
    r = torch.zeros(3, 3, 8, 8)
    r[0, :, 2, 2] = 0.5
    r[1] = 0.01
    first = noise_like(r, torch.Generator().manual_seed(1))
    again = noise_like(r, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert torch.allclose(first.flatten(1).norm(dim=1), r.flatten(1).norm(dim=1), atol=1e-6)
    assert torch.count_nonzero(first[2]) == 0  # no perturbation, no noise
    # Noise spreads the energy: image 0's single-pixel r becomes noise on (almost) every pixel.
    assert torch.count_nonzero(first[0]) > 150


def test_summed_perturbation_keeps_the_image_in_range() -> None:
    clean = torch.full((1, 3, 4, 4), 0.9)
    a, b = torch.full_like(clean, 0.08), torch.full_like(clean, 0.08)
    total = summed_perturbation(clean, a, b)
    assert torch.allclose(total, torch.full_like(clean, 0.1))  # 0.9 + 0.16 clipped at 1
    assert torch.allclose(summed_perturbation(clean, -a, b), torch.zeros_like(clean))
    with pytest.raises(RobucapError, match="shaped like the images"):
        summed_perturbation(clean, torch.zeros(1, 3, 2, 2))
    with pytest.raises(RobucapError, match="one or more perturbations"):
        summed_perturbation(clean)


def _centre_brightness(images: torch.Tensor) -> tuple[dict[str, float], list[torch.Tensor]]:
    """A 'victim' that scores the mean of the centre 2x2 pixels: structure-sensitive by construction."""
    return {"miou": float(images[:, :, 3:5, 3:5].mean())}, list(images)


def test_transfer_row_scores_clean_perturbed_and_the_same_permutations_as_table_1() -> None:
    clean = torch.full((2, 3, 8, 8), 0.2)
    r = torch.zeros_like(clean)
    r[:, :, 3:5, 3:5] = 0.5  # all the energy where the scorer looks
    row = transfer_row("segmenter", "toy", "task", clean, r, _centre_brightness, "miou", seed=4)
    assert row.clean == pytest.approx(0.2) and row.perturbed == pytest.approx(0.7) and row.n == 2
    generator = torch.Generator().manual_seed(4)
    draws = [
        _centre_brightness(clean + permute_rows_columns(r, generator))[0]["miou"] for _ in range(PERMUTATION_DRAWS)
    ]
    assert row.permuted == pytest.approx(sum(draws) / len(draws))
    assert row.permuted < row.perturbed  # permuting moves the energy away from the centre
    assert row.drop == pytest.approx(row.clean - row.perturbed)
    assert row.p == pytest.approx(float((r[0].pow(2).sum() / 64).sqrt()))
    assert row.to_json()["drop"] == pytest.approx(-0.5)
    with pytest.raises(RobucapError, match="transfer relation must be one of"):
        transfer_row("a", "b", "sideways", clean, r, _centre_brightness, "miou")


def test_resize_is_identity_at_the_same_size_and_antialiased_when_shrinking() -> None:
    images = torch.rand(2, 3, 16, 16)
    assert resize_images(images, 16) is images
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    small = resize_images(checker.float().expand(1, 3, 16, 16), 8)
    assert small.shape == (1, 3, 8, 8)
    inner = small[..., 1:-1, 1:-1]  # antialiasing averages the checkerboard (the border weights are renormalised)
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=1e-5)
