"""Captioner networks behind one interface, each chosen and configured by its settings dataclass."""

from modules.captioners.attention_lstm import AttentionLSTMDecoder, SoftAttention
from modules.captioners.base import Captioner, CaptionerOutput, ImageNormalize, caption_loss, shift_right
from modules.captioners.cnn_encoder import CNNEncoder
from modules.captioners.factory import ARCHITECTURES, build_captioner
from modules.captioners.settings import CaptionerSettings, registered_captioners, resolve_captioner_settings
from modules.captioners.show_attend_tell import PRESETS as SAT_PRESETS
from modules.captioners.show_attend_tell import (
    ShowAttendTellCaptioner,
    ShowAttendTellConfig,
    ShowAttendTellSettings,
    attention_penalty,
    build_show_attend_tell,
)
from modules.captioners.vit_gpt2 import PRESETS, ViTGPT2Captioner, ViTGPT2Settings, build_vit_gpt2

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "SAT_PRESETS",
    "AttentionLSTMDecoder",
    "CNNEncoder",
    "Captioner",
    "CaptionerOutput",
    "CaptionerSettings",
    "ImageNormalize",
    "ShowAttendTellCaptioner",
    "ShowAttendTellConfig",
    "ShowAttendTellSettings",
    "SoftAttention",
    "ViTGPT2Captioner",
    "ViTGPT2Settings",
    "attention_penalty",
    "build_captioner",
    "build_show_attend_tell",
    "build_vit_gpt2",
    "caption_loss",
    "registered_captioners",
    "resolve_captioner_settings",
    "shift_right",
]
