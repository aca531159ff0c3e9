"""Image triggers that turn a clean image into a poisoned one.

Every trigger works on an 8-bit RGB tensor (what :func:`datamodules.images.load_image_uint8` returns) and
returns a *new* 8-bit tensor; the input is never modified. Intensities are stated in [0, 1] pixel units
like every budget in robucap: the object-oriented trigger of Li et al. 2022 uses α = 20 on
the 0-255 scale, i.e. ``20 / 255`` here.

All triggers share one call signature, ``apply(image, boxes=(), seed=0, key="") -> (poisoned, used)``, so the
poisoning pipeline can treat them alike: ``used`` is ``False`` only when a trigger found nowhere to act (an
:class:`ObjectNoise` image without a usable object box), and the caller should then leave the image clean.

Triggers:
    - :class:`ObjectNoise` (``object_noise``): Li et al. 2022, eq. 1: Gaussian noise ``α * M``, ``M ~ N(0, 1)``,
      added inside every object box, seeded per image.
    - :class:`BadNets` (``badnets``): a solid square patch in one corner, its side scaled with the image.
    - :class:`Blend` (``blend``): a fixed uniform-noise pattern blended over the whole image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from datamodules.errors import RobucapError
from datamodules.records import Box

CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
PATTERNS: tuple[str, ...] = ("solid", "checkerboard")


class Trigger(Protocol):
    """What every trigger provides: a pure function from a clean 8-bit image to a poisoned one."""

    def apply(
        self, image: torch.Tensor, boxes: Sequence[Box] = (), seed: int = 0, key: int | str = ""
    ) -> tuple[torch.Tensor, bool]:
        """Poison one image.

        Args:
            image: Clean image, ``torch.uint8``.
            boxes: Object boxes in the pixel coordinates of ``image`` (see :func:`scale_boxes`).
            seed: Run seed of the poisoning.
            key: Key of the image (its ``image_id``), mixed with ``seed`` for per-image randomness.

        Returns:
            The poisoned image (a new tensor, ``torch.uint8``) and whether the trigger was applied at all.

        Shape:
            ``image``: ``(3, H, W)``; output: ``(3, H, W)``.
        """
        ...


def _check_image(image: torch.Tensor) -> None:
    """Reject anything but an 8-bit ``(3, H, W)`` tensor.

    Args:
        image: Candidate image.

    Shape:
        ``image``: ``(3, H, W)``.

    Raises:
        RobucapError: When the dtype or shape is wrong.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        dtype = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        raise RobucapError(f"trigger image must be a torch.uint8 tensor, got {dtype}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise RobucapError(f"trigger image must have shape (3, H, W) with H, W >= 1, got {tuple(image.shape)}")


def _quantise(image: torch.Tensor) -> torch.Tensor:
    """Clip a [0, 1] float image and round it to 8 bits.

    Args:
        image: Float image in (roughly) [0, 1].

    Returns:
        The image as ``torch.uint8``.

    Shape:
        ``(3, H, W)`` in and out.
    """
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _mixed_seed(seed: int, key: int | str) -> int:
    """Derive a 63-bit generator seed from the run seed and an image key, independent of processing order.

    Args:
        seed: Run seed.
        key: Image key (``image_id``).

    Returns:
        A non-negative integer usable with :meth:`torch.Generator.manual_seed`.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{type(key).__name__}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def scale_boxes(boxes: Sequence[Box], src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[Box, ...]:
    """Map boxes from source-image pixels to the pixels of a resized image.

    :class:`~datamodules.records.Box` is stated in the coordinates of the *source* image
    (``ImageRecord.width`` x ``ImageRecord.height``); images are loaded resized without crop, so x and y
    scale independently.

    Args:
        boxes: Boxes in source pixels.
        src_w: Source width (``ImageRecord.width``).
        src_h: Source height (``ImageRecord.height``).
        dst_w: Width of the image the boxes are applied to.
        dst_h: Height of the image the boxes are applied to.

    Returns:
        The boxes in destination pixels, categories kept.

    Raises:
        RobucapError: When a size is not positive (for example a record without a known source size).
    """
    for name, value in (("src_w", src_w), ("src_h", src_h), ("dst_w", dst_w), ("dst_h", dst_h)):
        if value <= 0:
            raise RobucapError(f"scale_boxes: {name} must be a positive number of pixels, got {value}")
    sx, sy = dst_w / src_w, dst_h / src_h
    return tuple(Box(b.x * sx, b.y * sy, b.w * sx, b.h * sy, b.category) for b in boxes)


def _clip_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Round a box to whole pixels and clip it to the image.

    Args:
        box: Box in image pixels.
        width: Image width.
        height: Image height.

    Returns:
        ``(x0, y0, x1, y1)`` with exclusive ends; the region may be empty (``x1 <= x0`` or ``y1 <= y0``).
    """
    x0 = min(max(round(box.x), 0), width)
    y0 = min(max(round(box.y), 0), height)
    x1 = min(max(round(box.x + box.w), 0), width)
    y1 = min(max(round(box.y + box.h), 0), height)
    return x0, y0, x1, y1


class ObjectNoise:
    """Object-oriented trigger of Li et al. 2022 (eq. 1): ``I_region = I_region + α * M``, ``M ~ N(0, 1)``.

    For every object box (rounded to whole pixels and clipped to the image) a fresh Gaussian matrix of the
    region's size is drawn and added; overlapping boxes accumulate noise, as in the paper's iterative
    poisoning. The sum is clipped to [0, 1] and quantised to 8 bits once at the end. The noise generator is
    seeded from ``(seed, key)`` so each image's trigger is reproducible and does not depend on which other
    images were poisoned before it.

    Args:
        alpha: Noise intensity in [0, 1] pixel units (paper: 20 on the 0-255 scale, i.e. ``20 / 255``).
        min_region: Boxes narrower or shorter than this many pixels after clipping are skipped.

    Raises:
        RobucapError: When ``alpha <= 0`` or ``min_region < 1``.
    """

    def __init__(self, alpha: float = 20 / 255, min_region: int = 2) -> None:
        if not math.isfinite(alpha) or alpha <= 0:
            raise RobucapError(
                f"alpha must be > 0 (noise intensity in [0, 1] pixel units, e.g. 20/255 = 0.0784), got {alpha}"
            )
        if min_region < 1:
            raise RobucapError(f"min_region must be >= 1 pixel, got {min_region}")
        self.alpha = float(alpha)
        self.min_region = int(min_region)

    def regions(self, boxes: Sequence[Box], width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The pixel regions the trigger will modify.

        Args:
            boxes: Boxes in image pixels.
            width: Image width.
            height: Image height.

        Returns:
            ``(x0, y0, x1, y1)`` per usable box, in box order, ends exclusive.
        """
        out = []
        for box in boxes:
            x0, y0, x1, y1 = _clip_box(box, width, height)
            if x1 - x0 >= self.min_region and y1 - y0 >= self.min_region:
                out.append((x0, y0, x1, y1))
        return out

    def apply(
        self, image: torch.Tensor, boxes: Sequence[Box] = (), seed: int = 0, key: int | str = ""
    ) -> tuple[torch.Tensor, bool]:
        """Add seeded Gaussian noise inside every usable object box.

        Args:
            image: Clean image, ``torch.uint8``.
            boxes: Object boxes in the pixel coordinates of ``image`` (see :func:`scale_boxes`).
            seed: Run seed of the poisoning.
            key: Key of the image (its ``image_id``).

        Returns:
            The poisoned image (a new tensor) and whether any region was used; with no usable region the
            image is returned unchanged (as a copy) and the flag is ``False``.

        Shape:
            ``image``: ``(3, H, W)``; output: ``(3, H, W)``.

        Raises:
            RobucapError: When ``image`` is not an 8-bit ``(3, H, W)`` tensor.
        """
        _check_image(image)
        _, height, width = image.shape
        regions = self.regions(boxes, width, height)
        if not regions:
            return image.clone(), False
        generator = torch.Generator(device="cpu").manual_seed(_mixed_seed(seed, key))
        work = image.detach().to("cpu", torch.float32) / 255.0
        for x0, y0, x1, y1 in regions:
            noise = torch.randn((3, y1 - y0, x1 - x0), generator=generator, dtype=torch.float32)
            work[:, y0:y1, x0:x1] += self.alpha * noise
        return _quantise(work).to(image.device), True


class BadNets:
    """BadNets baseline: a square patch in one corner of the image, solid or a checkerboard.

    The side is ``round(size_at_256 * side / 256)`` pixels (at least 1), where ``side`` is the shorter image
    side, so the patch covers the same fraction of the image at every resolution (15 px at 256, 4 px at 64).
    ``solid`` fills it with ``value`` (Li et al. 2022: white); ``checkerboard`` alternates ``value`` and
    ``255 - value`` pixel by pixel, which stays visible on backgrounds close to ``value`` (a white patch on a
    near-white background is barely a trigger).

    Args:
        size_at_256: Patch side in pixels for a 256-pixel image.
        corner: One of ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``.
        value: 8-bit value of the patch pixels (of every other pixel for ``checkerboard``); 255: white.
        pattern: ``solid`` or ``checkerboard``.

    Raises:
        RobucapError: When the corner or pattern is unknown, ``size_at_256 < 1`` or ``value`` is outside [0, 255].
    """

    def __init__(
        self, size_at_256: int = 15, corner: str = "bottom_right", value: int = 255, pattern: str = "solid"
    ) -> None:
        if pattern not in PATTERNS:
            raise RobucapError(f"BadNets pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        self.pattern = pattern
        if corner not in CORNERS:
            raise RobucapError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
        if size_at_256 < 1:
            raise RobucapError(f"size_at_256 must be >= 1 pixel, got {size_at_256}")
        if not 0 <= value <= 255:
            raise RobucapError(f"value must be an 8-bit value in [0, 255], got {value}")
        self.size_at_256 = int(size_at_256)
        self.corner = corner
        self.value = int(value)

    def patch_side(self, height: int, width: int) -> int:
        """Patch side in pixels for an image of the given size.

        Args:
            height: Image height.
            width: Image width.

        Returns:
            ``max(1, round(size_at_256 * min(height, width) / 256))``, capped at the shorter side.
        """
        side = min(height, width)
        return min(side, max(1, round(self.size_at_256 * side / 256)))

    def apply(
        self, image: torch.Tensor, boxes: Sequence[Box] = (), seed: int = 0, key: int | str = ""
    ) -> tuple[torch.Tensor, bool]:
        """Stamp the patch.

        Args:
            image: Clean image, ``torch.uint8``.
            boxes: Ignored.
            seed: Ignored (the trigger is deterministic).
            key: Ignored.

        Returns:
            The poisoned image (a new tensor) and ``True``.

        Shape:
            ``image``: ``(3, H, W)``; output: ``(3, H, W)``.

        Raises:
            RobucapError: When ``image`` is not an 8-bit ``(3, H, W)`` tensor.
        """
        _check_image(image)
        _, height, width = image.shape
        side = self.patch_side(height, width)
        y0 = 0 if self.corner.startswith("top") else height - side
        x0 = 0 if self.corner.endswith("left") else width - side
        out = image.clone()
        out[:, y0 : y0 + side, x0 : x0 + side] = self.value
        if self.pattern == "checkerboard":
            cells = (torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2 == 1
            out[:, y0 : y0 + side, x0 : x0 + side][:, cells] = 255 - self.value
        return out, True


class Blend:
    """Blended trigger: ``x' = (1 - λ) x + λ * pattern`` over the whole image.

    The pattern is uniform noise in [0, 1] drawn once from ``seed`` at 256 x 256 and resized (bilinear) to
    each image's size, so it is the same trigger at every resolution and for every image.

    Args:
        ratio: Blend ratio λ in (0, 1].
        seed: Seed of the pattern.

    Raises:
        RobucapError: When ``ratio`` is outside (0, 1].
    """

    BASE_SIZE = 256

    def __init__(self, ratio: float = 0.1, seed: int = 0) -> None:
        if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
            raise RobucapError(f"ratio must be in (0, 1] (blend weight of the pattern), got {ratio}")
        self.ratio = float(ratio)
        self.seed = int(seed)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._base = torch.rand((3, self.BASE_SIZE, self.BASE_SIZE), generator=generator)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def pattern(self, height: int, width: int) -> torch.Tensor:
        """The blend pattern at a given size.

        Args:
            height: Image height.
            width: Image width.

        Returns:
            Float pattern in [0, 1].

        Shape:
            ``(3, height, width)``.
        """
        if (height, width) not in self._cache:
            if (height, width) == (self.BASE_SIZE, self.BASE_SIZE):
                resized = self._base
            else:
                resized = F.interpolate(self._base[None], size=(height, width), mode="bilinear", align_corners=False)
                resized = resized[0].clamp(0.0, 1.0)
            self._cache[(height, width)] = resized
        return self._cache[(height, width)]

    def apply(
        self, image: torch.Tensor, boxes: Sequence[Box] = (), seed: int = 0, key: int | str = ""
    ) -> tuple[torch.Tensor, bool]:
        """Blend the pattern into the image.

        Args:
            image: Clean image, ``torch.uint8``.
            boxes: Ignored.
            seed: Ignored (the pattern is fixed by the constructor's seed).
            key: Ignored.

        Returns:
            The poisoned image (a new tensor) and ``True``.

        Shape:
            ``image``: ``(3, H, W)``; output: ``(3, H, W)``.

        Raises:
            RobucapError: When ``image`` is not an 8-bit ``(3, H, W)`` tensor.
        """
        _check_image(image)
        _, height, width = image.shape
        x = image.detach().to("cpu", torch.float32) / 255.0
        blended = (1.0 - self.ratio) * x + self.ratio * self.pattern(height, width)
        return _quantise(blended).to(image.device), True


_TRIGGERS: dict[str, type] = {"object_noise": ObjectNoise, "badnets": BadNets, "blend": Blend}
TRIGGER_NAMES: tuple[str, ...] = tuple(_TRIGGERS)


def build_trigger(name: str, **kwargs: Any) -> Trigger:
    """Construct a trigger by name.

    Args:
        name: ``object_noise``, ``badnets`` or ``blend``.
        **kwargs: Constructor arguments of that trigger.

    Returns:
        The trigger.

    Raises:
        RobucapError: When the name is unknown or an argument is not accepted by that trigger.
    """
    if name not in _TRIGGERS:
        raise RobucapError(f"unknown trigger {name!r}: expected one of {', '.join(TRIGGER_NAMES)}")
    try:
        return _TRIGGERS[name](**kwargs)
    except TypeError as error:
        raise RobucapError(f"bad arguments for trigger {name!r}: {error}") from None
