"""Safe image paths and image decoding to the [0, 1] RGB tensors every dataset yields.

Two guarantees live here so that no loader has to re-implement them:

* :func:`resolve_inside` keeps every image path that a caption file names inside its image root, so a
  hostile or broken caption file cannot make training read ``/etc/passwd`` or a file behind a symlink.
* :func:`load_image` / :func:`load_image_uint8` turn any file Pillow can decode (grayscale, palette, CMYK,
  16-bit, with or without alpha) into 3-channel RGB, optionally resized to a square, and turn every decoding
  failure into one :class:`~datamodules.errors.DataError` that names the file.

Both loaders resize with Pillow on 8-bit data, so an image cached with :func:`load_image_uint8` and converted
later is bit-identical to one loaded directly with :func:`load_image`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError

__all__ = ["load_image", "load_image_uint8", "resolve_inside"]

_WHITE = (255, 255, 255, 255)
# Modes whose alpha channel must be composited away rather than dropped (dropping it would expose
# whatever colour the encoder left under transparent pixels, often black).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


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
    """Decode an image file to an 8-bit RGB tensor (compact enough to cache a whole split in memory).

    Grayscale, palette, CMYK and 16-bit images are converted to RGB; images with transparency are composited
    on white. With ``size`` the image is resized to ``size`` x ``size`` with antialiased bicubic filtering and
    no crop (the aspect ratio is not kept, so every object in the source stays in the frame).

    Args:
        path: Image file.
        size: Output side length in pixels, or ``None`` to keep the source size.

    Returns:
        The image as ``torch.uint8``.

    Shape:
        ``(3, size, size)``, or ``(3, H, W)`` of the source when ``size`` is ``None``.

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
            # EXIF orientation is deliberately not applied (as in torchvision's and pycocotools' loaders):
            # annotation boxes and sizes refer to the stored pixel grid.
            rgb = _to_rgb(image)
            if size is not None and rgb.size != (size, size):
                # Pillow's bicubic filter widens its support when downscaling, i.e. it antialiases.
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path} is not a readable image: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """Decode an image file to a float RGB tensor in [0, 1] (see :func:`load_image_uint8` for conversions).

    Args:
        path: Image file.
        size: Output side length in pixels, or ``None`` to keep the source size.

    Returns:
        The image as ``torch.float32`` with values in [0, 1].

    Shape:
        ``(3, size, size)``, or ``(3, H, W)`` of the source when ``size`` is ``None``.

    Raises:
        DataError: When the file does not exist or cannot be decoded (corrupt, truncated, not an image).
    """
    return load_image_uint8(path, size).to(torch.float32).div_(255.0)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _wide_to_rgb(image)
    # Palette, grayscale and RGB images can carry a single transparent colour (tRNS) instead of a channel.
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8 bits; Pillow's own conversion clips at 255 instead."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "F":
        # Float images are conventionally [0, 1]; anything larger is taken as already 8-bit scaled.
        scale = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
    else:
        # Pillow opens 16-bit PNG/TIFF grayscale as 32-bit "I"; values above 255 reveal the 16-bit range.
        scale = 65535.0 if values.size and values.max() > 255 else 255.0
    gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
