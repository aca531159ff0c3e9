"""The exported ``image-to-text`` pipeline: transformers' own, fed the image file as it is.

transformers' ``ImageToTextPipeline`` converts every input with ``image.convert("RGB")`` before the image processor
sees it, which drops transparency (robucap composites it on white) and clips 16-bit images (robucap scales them).
This subclass opens paths, URLs and base64 strings without converting and leaves all decoding to the export's
image processor, so a caption from ``pipeline("image-to-text", model=export_dir, trust_remote_code=True)`` is the
caption robucap gives for the same file.
"""

from __future__ import annotations

import base64
import binascii
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import requests
from PIL import Image
from transformers import ImageToTextPipeline, VisionEncoderDecoderModel
from transformers.image_processing_utils import BatchFeature

__all__ = ["RobucapImageToTextPipeline"]


class RobucapImageToTextPipeline(ImageToTextPipeline):
    """``ImageToTextPipeline`` that hands images to the image processor undecoded."""

    def check_model_type(self, supported_models: Any) -> None:
        """Accept the export's ``VisionEncoderDecoderModel`` subclass, which transformers' name list lacks."""
        if isinstance(self.model, VisionEncoderDecoderModel):
            return
        super().check_model_type(supported_models)

    def preprocess(self, image: Any, prompt: str | None = None, timeout: float | None = None) -> BatchFeature:
        """Open ``image`` (PIL image, path, URL or base64 string) and run the image processor on it.

        Raises:
            ValueError: With a ``prompt`` (a vision-encoder-decoder captioner takes none), or an unreadable string.
        """
        if prompt is not None:
            raise ValueError("a vision-encoder-decoder captioner takes no prompt")
        inputs = self.image_processor(images=open_image(image, timeout), return_tensors=self.framework)
        return inputs.to(self.dtype) if self.framework == "pt" else inputs


def open_image(image: Any, timeout: float | None = None) -> Image.Image:
    """Open an image like transformers' ``load_image`` does, but without EXIF transposition or RGB conversion.

    Args:
        image: A PIL image, a local file path, an ``http(s)://`` URL, or a base64 string (optionally a
            ``data:image/...`` URL).
        timeout: Seconds to wait for a URL.

    Returns:
        The image in its stored mode, not yet decoded.

    Raises:
        TypeError: When ``image`` is neither a PIL image nor a string.
        ValueError: When a string is neither a file, a URL nor valid base64.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        raise TypeError(f"expected a PIL image, a path, a URL or a base64 string, got {type(image).__name__}")
    if image.startswith(("http://", "https://")):
        return Image.open(BytesIO(requests.get(image, timeout=timeout).content))
    if os.path.isfile(image):
        # Read the bytes so no file handle stays open until the image is garbage-collected.
        return Image.open(BytesIO(Path(image).read_bytes()))
    encoded = image.split(",", 1)[1] if image.startswith("data:image/") else image
    try:
        return Image.open(BytesIO(base64.b64decode(encoded, validate=True)))
    except (binascii.Error, OSError) as error:
        raise ValueError(f"not a file, an http(s) URL or a base64-encoded image: {image[:80]!r} ({error})") from error
