"""The image processor of a ``robucap export``: the pixels robucap's own loaders give, for transformers users.

``robucap export`` saves :class:`RobucapImageProcessor` with the model; transformers copies this file and its only
local dependency, ``image_decode.py``, into the export directory, so that
``AutoImageProcessor.from_pretrained(export_dir, trust_remote_code=True)`` loads it without robucap installed.
It must therefore import nothing from robucap except that sibling module, by a relative import.

For any input it computes exactly what robucap feeds the captioner in training and evaluation:
:func:`datamodules.images.load_image` (EXIF orientation, alpha on white, 16-bit scaled, bicubic resize without crop,
``/ 255``) followed by the captioner's normalisation ``(x - mean) / std``, in the same float32 operations, so the
tensors are bit-for-bit equal.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_decode import decode_uint8

__all__ = ["RobucapImageProcessor"]

# Array inputs: grayscale, RGB or RGBA 8-bit pixels, as Pillow's Image.fromarray reads them.
_ARRAY_CHANNELS = (3, 4)


class RobucapImageProcessor(BaseImageProcessor):
    """Decode (EXIF orientation, alpha on white, 16-bit scaled), resize without crop, scale to [0, 1], normalise.

    Args:
        size: ``{"height": H, "width": W}`` the model was trained at.
        image_mean: Per-channel mean of the captioner's normalisation.
        image_std: Per-channel standard deviation of the captioner's normalisation.
        **kwargs: Further saved attributes (``auto_map`` and the like), kept as they are.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if size is None or image_mean is None or image_std is None:
            raise ValueError(
                "RobucapImageProcessor needs size, image_mean and image_std (see preprocessor_config.json)"
            )
        self.size = {"height": int(size["height"]), "width": int(size["width"])}
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Turn one image or a list of images into normalised pixel values.

        Args:
            images: A PIL image, an image file path, a ``uint8`` array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``,
                or a list of those. PIL images keep their mode, alpha and EXIF orientation until decoded here.
            return_tensors: ``"pt"`` for torch tensors, ``"np"`` or ``None`` for numpy arrays.
            **kwargs: Not accepted: resizing and normalisation are fixed by the training run.

        Returns:
            ``pixel_values``.

        Shape:
            ``pixel_values``: ``(B, 3, height, width)``, float32.

        Raises:
            TypeError: On an input that is not an image, a path or a ``uint8`` array.
            ValueError: On an empty list, an unknown ``return_tensors`` or a per-call option.
        """
        if kwargs:
            raise ValueError(
                f"RobucapImageProcessor takes no per-call options (got {', '.join(sorted(kwargs))}): size and "
                "normalisation are those of the training run, in preprocessor_config.json"
            )
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("RobucapImageProcessor got an empty list of images")
        pixels = torch.stack([self._unit_pixels(image) for image in batch])
        # The same float32 operations as robucap's ImageNormalize, so the result is bit-for-bit the same.
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        normalized = (pixels - mean) / std
        values = normalized if return_tensors == "pt" else normalized.numpy()
        return BatchFeature(data={"pixel_values": values}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        """The saved attributes, without ``image_processor_type``.

        transformers 4.57 warns "Using a slow image processor as `use_fast` is unset" whenever the saved
        configuration names a processor type; ``auto_map`` alone finds this class, with no warning. (There is no
        fast variant: torchvision's resize is not Pillow's, and exactness is the point of this class.)
        """
        output = super().to_dict()
        output.pop("image_processor_type", None)
        return output

    def _unit_pixels(self, image: Any) -> torch.Tensor:
        """One image as float32 in [0, 1], exactly as robucap's ``load_image`` computes it. Shape: ``(3, H, W)``."""
        size = (self.size["width"], self.size["height"])
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()
                array = decode_uint8(opened, size)
        elif isinstance(image, Image.Image):
            array = decode_uint8(image, size)
        elif _is_uint8_image_array(image):
            array = decode_uint8(Image.fromarray(image), size)
        else:
            raise TypeError(
                f"RobucapImageProcessor takes PIL images, image file paths or uint8 arrays (H, W[, 3 or 4]), "
                f"got {type(image).__name__}"
            )
        return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)


def _is_uint8_image_array(value: Any) -> bool:
    """Whether ``value`` is a ``uint8`` array Pillow reads as grayscale, RGB or RGBA."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
        return False
    return value.ndim == 2 or (value.ndim == 3 and value.shape[2] in _ARRAY_CHANNELS)
