"""Decode any Pillow image to the 8-bit RGB pixels robucap trains on; numpy and Pillow only, no robucap import.

This is the single definition of "the pixels of an image file" for robucap: the data loaders
(:mod:`datamodules.images`) call it, and ``robucap export`` copies this file verbatim next to the exported image
processor, so that a transformers user who loads the export gets bit-for-bit the same pixels without robucap
installed. It must therefore import nothing but the standard library, numpy and Pillow.

What it guarantees, for every mode Pillow decodes (RGB, grayscale, palette with or without a transparent colour,
RGBA / LA / PA, 1-bit, CMYK, 16-bit and 32-bit integer or float grayscale):

* The EXIF orientation tag is applied first (a photo taken sideways is upright), as cameras and browsers show it.
* Transparency is composited on white; dropping alpha would expose whatever the encoder left under transparent
  pixels, often black.
* 16-bit grayscale is scaled to 8 bits (Pillow's own conversion clips at 255 instead).
* The result is 8-bit RGB; :func:`decode_uint8` resizes it with Pillow's antialiased bicubic filter, no crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["EXIF_ORIENTATION_TAG", "decode_rgb", "decode_uint8", "exif_orientation"]

# The EXIF "Orientation" tag; values 2-8 name one of the 7 flips/rotations (1 = as stored).
EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS = frozenset(range(2, 9))
_WHITE = (255, 255, 255, 255)
# Modes whose alpha channel must be composited away rather than dropped.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) when it has none or an invalid one.

    Args:
        image: An opened image (Pillow reads the tag from the file header; for PNG it may decode the file).

    Returns:
        An orientation in 1..8, the value :func:`PIL.ImageOps.exif_transpose` acts on.
    """
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if value in _ORIENTATIONS else 1


def decode_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert any mode to 8-bit RGB, compositing transparency on white.

    Args:
        image: An opened image of any mode.

    Returns:
        An RGB image, upright; its size is the source size with width and height swapped for orientations 5-8.
    """
    if exif_orientation(image) != 1:
        # Only then: exif_transpose copies the whole image even when there is nothing to do.
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def decode_uint8(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode with :func:`decode_rgb`, then resize to ``size`` with antialiased bicubic filtering (no crop).

    Args:
        image: An opened image of any mode.
        size: ``(width, height)`` of the result, or ``None`` to keep the upright source size.

    Returns:
        The pixels as a C-contiguous ``uint8`` array.

    Shape:
        ``(height, width, 3)``.
    """
    rgb = decode_rgb(image)
    if size is not None and rgb.size != tuple(size):
        # Pillow's bicubic filter widens its support when downscaling, i.e. it antialiases.
        rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8, copy=True)


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
        # Pillow opens some 16-bit PNG/TIFF grayscale as 32-bit "I"; values above 255 reveal the 16-bit range.
        scale = 65535.0 if values.size and values.max() > 255 else 255.0
    gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
