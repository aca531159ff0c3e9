"""Captioner networks behind one interface."""

from modules.captioners.base import Captioner, CaptionerOutput, ImageNormalize, caption_loss
from modules.captioners.factory import ARCHITECTURES, build_captioner
from modules.captioners.vit_gpt2 import PRESETS, ViTGPT2Captioner, build_vit_gpt2

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Captioner",
    "CaptionerOutput",
    "ImageNormalize",
    "ViTGPT2Captioner",
    "build_captioner",
    "build_vit_gpt2",
    "caption_loss",
]
