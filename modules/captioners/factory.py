"""One entry point to build any captioner by architecture name."""

from __future__ import annotations

from typing import Any

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.captioners.base import Captioner
from modules.captioners.show_attend_tell import build_show_attend_tell
from modules.captioners.vit_gpt2 import build_vit_gpt2

ARCHITECTURES = ("vit_gpt2", "show_attend_tell")


def build_captioner(arch: str, vocab: VocabInfo, image_size: int, **kwargs: Any) -> Captioner:
    """Build a captioner.

    Args:
        arch: Architecture name, one of :data:`ARCHITECTURES`.
        vocab: Token ids of the tokenizer.
        image_size: Input side in pixels.
        **kwargs: Architecture options (``preset``, ``overrides``; pretrained directories for ``vit_gpt2``,
            ``encoder_weights`` for ``show_attend_tell``).
    """
    if arch == "vit_gpt2":
        return build_vit_gpt2(vocab, image_size, **kwargs)
    if arch == "show_attend_tell":
        return build_show_attend_tell(vocab, image_size, **kwargs)
    raise RobucapError(f"unknown captioner architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
