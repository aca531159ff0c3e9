"""Safe image paths and image decoding to the [0, 1] RGB tensors every dataset yields.

Two guarantees live here so that no loader has to re-implement them:

* :func:`resolve_inside` keeps every image path that a caption file names inside its image root, so a
  hostile or broken caption file cannot make training read ``/etc/passwd`` or a file behind a symlink.
* :func:`load_image` / :func:`load_image_uint8` turn any file Pillow can decode (grayscale, palette, CMYK,
  16-bit, with or without alpha) into upright 3-channel RGB, optionally resized to a square, and turn every
  decoding failure into one :class:`~datamodules.errors.DataError` that names the file.

The pixel conversion itself (EXIF orientation applied, alpha composited on white, 16-bit scaled, bicubic resize)
is :mod:`datamodules.image_decode`, which ``robucap export`` ships with the exported model so that transformers
users get exactly these pixels. EXIF orientation is applied because that is what a photo means; object boxes from
annotations refer to the stored pixel grid and are turned with the image by
:func:`datamodules.poisoning.regions.orient_boxes` (see :func:`image_orientation`).

Both loaders resize with Pillow on 8-bit data, so an image cached with :func:`load_image_uint8` and converted
later is bit-identical to one loaded directly with :func:`load_image`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from datamodules.errors import DataError
from datamodules.image_decode import decode_uint8, exif_orientation

__all__ = ["image_orientation", "load_image", "load_image_uint8", "resolve_inside"]

# Everything Pillow raises for a file that is not a decodable image (corrupt, truncated, unknown format, too big).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def resolve_inside(root: Path, relative: str, source: str | Path) -> Path:
    """Join ``relative`` onto ``root`` and resolve it, refusing any result outside ``root``.

    Symlinks are followed (both in ``root`` and in ``relative``), so a link that points out of the root is
    caught just like ``../`` segments or an absolute path. The file need not exist.

    Args:
        root: The image root directory.
        relative: Image path as written in the caption file.
        source: The caption file (or other source) that named the path, for the error message.

    Returns:
        The absolute, resolved path of the image.

    Raises:
        DataError: When the resolved path is not inside the resolved ``root``.
    """
    real_root = os.path.realpath(root)
    # os.path.join lets an absolute ``relative`` replace the root, which the containment check then rejects.
    real = os.path.realpath(os.path.join(real_root, relative))
    if real == real_root:
        raise DataError(f"{source}: image path {relative!r} does not name a file inside the image root {real_root}")
    if os.path.commonpath([real_root, real]) == real_root:
        return Path(real)
    raise DataError(
        f"{source}: image path {relative!r} resolves to {real}, which is outside the image root {real_root}; "
        "image paths must be relative paths inside the image root"
    )


def load_image_uint8(path: Path, size: int | None = None) -> torch.Tensor:
    """Decode an image file to an upright 8-bit RGB tensor (compact enough to cache a whole split in memory).

    The EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are converted to RGB; images with
    transparency are composited on white (:func:`datamodules.image_decode.decode_rgb`). With ``size`` the image is
    resized to ``size`` x ``size`` with antialiased bicubic filtering and no crop (the aspect ratio is not kept,
    so every object in the source stays in the frame).

    Args:
        path: Image file.
        size: Output side length in pixels, or ``None`` to keep the (upright) source size.

    Returns:
        The image as ``torch.uint8``.

    Shape:
        ``(3, size, size)``, or ``(3, H, W)`` of the upright source when ``size`` is ``None``.

    Raises:
        DataError: When the file does not exist or cannot be decoded (corrupt, truncated, not an image).
    """
    if size is not None and size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {size}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a readable image: the file does not exist")
    try:
        with Image.open(path) as image:
            # Decoding happens lazily; load() forces it here so truncated files fail inside this try.
            image.load()
            array = decode_uint8(image, None if size is None else (size, size))
    except _DECODE_ERRORS as error:
        raise DataError(f"{path} is not a readable image: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_orientation(path: Path) -> int:
    """The EXIF orientation of an image file: 1 when stored upright, 2-8 for the flips and rotations.

    :func:`load_image` applies it, so anything given in the stored pixel grid (COCO boxes) must be turned too.

    Args:
        path: Image file.

    Returns:
        The orientation, 1..8.

    Raises:
        DataError: When the file does not exist or cannot be read as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a readable image: the file does not exist")
    try:
        with Image.open(path) as image:
            return exif_orientation(image)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path} is not a readable image: {error}") from error


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """Decode an image file to a float RGB tensor in [0, 1] (see :func:`load_image_uint8` for conversions).

    Args:
        path: Image file.
        size: Output side length in pixels, or ``None`` to keep the (upright) source size.

    Returns:
        The image as ``torch.float32`` with values in [0, 1].

    Shape:
        ``(3, size, size)``, or ``(3, H, W)`` of the upright source when ``size`` is ``None``.

    Raises:
        DataError: When the file does not exist or cannot be decoded (corrupt, truncated, not an image).
    """
    return load_image_uint8(path, size).to(torch.float32).div_(255.0)
