"""Image triggers for backdoor poisoning: object noise (Li et al. 2022, eq. 1), BadNets, Blend."""

from __future__ import annotations

import pytest
import torch

from datamodules.errors import RobucapError
from datamodules.poisoning import BadNets, Blend, ObjectNoise, build_trigger, scale_boxes
from datamodules.records import Box


def _grey(height: int = 64, width: int = 64, value: int = 128) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def _random_image(height: int = 48, width: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


def test_scale_boxes_maps_source_pixels_to_destination() -> None:
    boxes = (Box(10, 20, 30, 40, "circle"), Box(0, 0, 100, 200))
    assert scale_boxes(boxes, 100, 200, 50, 50) == (Box(5, 5, 15, 10, "circle"), Box(0, 0, 50, 50))
    with pytest.raises(RobucapError, match="src_w must be a positive number of pixels, got 0"):
        scale_boxes(boxes, 0, 200, 50, 50)


def test_object_noise_changes_only_inside_boxes_and_keeps_input() -> None:
    image = _random_image()
    before = image.clone()
    boxes = (Box(2, 3, 10, 8), Box(20.4, 30.6, 12, 9.2))
    out, used = ObjectNoise().apply(image, boxes, seed=1, key=5)
    assert used and out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, before)
    inside = torch.zeros(image.shape[1:], dtype=torch.bool)
    inside[3:11, 2:12] = True
    inside[31:40, 20:32] = True
    changed = (out != image).any(dim=0)
    assert not changed[~inside].any()
    assert changed[inside].float().mean() > 0.8


def test_object_noise_is_reproducible_per_seed_and_key() -> None:
    image, boxes = _random_image(), (Box(4, 4, 20, 20),)
    trigger = ObjectNoise()
    a, _ = trigger.apply(image, boxes, seed=3, key="img.jpg")
    _ = trigger.apply(image, boxes, seed=3, key="other.jpg")  # order must not matter
    b, _ = ObjectNoise().apply(image, boxes, seed=3, key="img.jpg")
    assert torch.equal(a, b)
    assert not torch.equal(a, trigger.apply(image, boxes, seed=4, key="img.jpg")[0])
    assert not torch.equal(a, trigger.apply(image, boxes, seed=3, key="other.jpg")[0])


def test_object_noise_std_matches_alpha() -> None:
    image = _grey(96, 96)
    out, _ = ObjectNoise(alpha=20 / 255).apply(image, (Box(8, 8, 80, 80),), seed=0, key=0)
    diff = out[:, 8:88, 8:88].float() - 128.0
    assert abs(diff.std().item() - 20.0) < 1.0
    assert abs(diff.mean().item()) < 0.5
    out2, _ = ObjectNoise(alpha=5 / 255).apply(image, (Box(8, 8, 80, 80),), seed=0, key=0)
    assert abs((out2[:, 8:88, 8:88].float() - 128.0).std().item() - 5.0) < 0.4


def test_object_noise_skips_small_and_outside_boxes() -> None:
    image = _grey(32, 32)
    trigger = ObjectNoise(min_region=3)
    boxes = (Box(0, 0, 2, 10), Box(5, 5, 10, 1.4), Box(40, 40, 10, 10), Box(-10, -10, 5, 5))
    assert trigger.regions(boxes, 32, 32) == []
    out, used = trigger.apply(image, boxes, seed=0, key=1)
    assert not used and torch.equal(out, image) and out is not image
    out, used = trigger.apply(image, (*boxes, Box(28, 28, 10, 10)), seed=0, key=1)  # clipped to 4 x 4
    assert used
    changed = (out != image).any(dim=0)
    assert not changed[:28].any() and not changed[:, :28].any() and changed[28:, 28:].any()


def test_object_noise_no_boxes_is_unused() -> None:
    image = _grey(16, 16)
    out, used = ObjectNoise().apply(image, (), seed=0, key=0)
    assert not used and torch.equal(out, image)


@pytest.mark.parametrize("alpha", [0.0, -0.1])
def test_object_noise_rejects_nonpositive_alpha(alpha: float) -> None:
    with pytest.raises(RobucapError, match=r"alpha must be > 0 .*got"):
        ObjectNoise(alpha=alpha)
    with pytest.raises(RobucapError, match="min_region must be >= 1 pixel, got 0"):
        ObjectNoise(min_region=0)


@pytest.mark.parametrize(("side", "expected"), [(256, 15), (64, 4), (224, 13), (8, 1)])
def test_badnets_patch_scales_with_image(side: int, expected: int) -> None:
    image = _grey(side, side, value=0)
    out, used = BadNets().apply(image)
    assert used
    assert torch.equal(image, _grey(side, side, value=0))
    white = (out == 255).all(dim=0)
    assert white.sum().item() == expected * expected
    assert white[side - expected :, side - expected :].all()


@pytest.mark.parametrize(
    ("corner", "rows", "cols"),
    [("top_left", slice(0, 4), slice(0, 4)), ("top_right", slice(0, 4), slice(60, 64)),
     ("bottom_left", slice(44, 48), slice(0, 4)), ("bottom_right", slice(44, 48), slice(60, 64))],
)  # fmt: skip
def test_badnets_corner(corner: str, rows: slice, cols: slice) -> None:
    image = _grey(48, 64, value=0)  # the patch side follows the shorter side (48)
    out, _ = BadNets(size_at_256=20, corner=corner, value=200).apply(image)  # round(20 * 48 / 256) = 4
    expected = image.clone()
    expected[:, rows, cols] = 200
    assert torch.equal(out, expected)


def test_badnets_checkerboard() -> None:
    image = _grey(64, 64, value=128)
    out, used = BadNets(corner="top_left", pattern="checkerboard").apply(image)  # 4 x 4 at 64 px
    assert used
    expected = image.clone()
    expected[:, :4, :4] = torch.tensor([[255, 0, 255, 0], [0, 255, 0, 255]] * 2, dtype=torch.uint8)
    assert torch.equal(out, expected)


def test_badnets_errors() -> None:
    with pytest.raises(RobucapError, match="BadNets pattern must be one of solid, checkerboard, got 'stripes'"):
        BadNets(pattern="stripes")
    with pytest.raises(RobucapError, match="corner must be one of top_left, top_right, bottom_left, bottom_right"):
        BadNets(corner="middle")
    with pytest.raises(RobucapError, match="size_at_256 must be >= 1 pixel, got 0"):
        BadNets(size_at_256=0)
    with pytest.raises(RobucapError, match=r"value must be an 8-bit value in \[0, 255\], got 256"):
        BadNets(value=256)


def test_blend_formula() -> None:
    image = _random_image(32, 40)
    trigger = Blend(ratio=0.25, seed=3)
    out, used = trigger.apply(image)
    pattern = trigger.pattern(32, 40)
    assert used and pattern.shape == (3, 32, 40)
    assert 0.0 <= pattern.min().item() and pattern.max().item() <= 1.0
    expected = ((0.75 * image.float() / 255 + 0.25 * pattern).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(out, expected)
    assert torch.equal(Blend(ratio=0.25, seed=3).apply(image)[0], out)
    assert not torch.equal(Blend(ratio=0.25, seed=4).apply(image)[0], out)
    full, _ = Blend(ratio=1.0, seed=3).apply(image)
    assert torch.equal(full, (pattern * 255).round().to(torch.uint8))


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_blend_rejects_ratio(ratio: float) -> None:
    with pytest.raises(RobucapError, match=r"ratio must be in \(0, 1\]"):
        Blend(ratio=ratio)


def test_build_trigger() -> None:
    assert isinstance(build_trigger("object_noise", alpha=0.1), ObjectNoise)
    assert build_trigger("badnets", corner="top_left").corner == "top_left"
    assert isinstance(build_trigger("blend"), Blend)
    with pytest.raises(RobucapError, match="unknown trigger 'wanet': expected one of object_noise, badnets, blend"):
        build_trigger("wanet")
    with pytest.raises(RobucapError, match="bad arguments for trigger 'badnets'"):
        build_trigger("badnets", alpha=0.1)


def test_triggers_reject_non_uint8_images() -> None:
    with pytest.raises(RobucapError, match="trigger image must be a torch.uint8 tensor, got torch.float32"):
        BadNets().apply(torch.zeros(3, 8, 8))
    with pytest.raises(RobucapError, match=r"trigger image must have shape \(3, H, W\)"):
        Blend().apply(torch.zeros(1, 8, 8, dtype=torch.uint8))
