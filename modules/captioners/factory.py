"""Build a captioner by architecture name (scripts and tests; ``CaptioningModule`` injects settings objects)."""

from __future__ import annotations

from typing import Any

from datamodules.tokenizer import VocabInfo
from modules.captioners.base import Captioner
from modules.captioners.settings import resolve_captioner_settings
from modules.captioners.show_attend_tell import ShowAttendTellSettings
from modules.captioners.vit_gpt2 import ViTGPT2Settings

# The built-in architectures (every imported captioner file adds its name to registered_captioners()).
ARCHITECTURES = (ViTGPT2Settings.name, ShowAttendTellSettings.name)


def build_captioner(arch: str, vocab: VocabInfo, image_size: int, **kwargs: Any) -> Captioner:
    """Build a captioner.

    Args:
        arch: A registered short name (``vit_gpt2``, ``show_attend_tell``) or the dotted path of a settings class.
        vocab: Token ids of the tokenizer.
        image_size: Input side in pixels.
        **kwargs: The architecture's settings (the fields of its settings dataclass, e.g. ``preset``).

    Raises:
        RobucapError: Unknown architecture or setting, or values the architecture cannot build.
    """
    return resolve_captioner_settings({"class_path": arch, "init_args": kwargs}).build(vocab, image_size)
