"""Caption metrics: DDP-exact corpus BLEU for training, pycocoevalcap scores for testing, unique gathering."""

from modules.metrics.backdoor import (
    DEFAULT_RELAXED_THRESHOLD,
    TargetCaptionRate,
    is_target_caption,
    target_bleu4,
)
from modules.metrics.bleu import BLEU_KEYS, CaptionBLEU, bleu_statistics, image_key, sentence_bleu
from modules.metrics.coco_eval import COCO_KEYS, coco_caption_scores, java_available, ptb_tokenize
from modules.metrics.gather import gather_unique

__all__ = [
    "BLEU_KEYS",
    "COCO_KEYS",
    "CaptionBLEU",
    "bleu_statistics",
    "coco_caption_scores",
    "gather_unique",
    "image_key",
    "java_available",
    "ptb_tokenize",
    "sentence_bleu",
    "DEFAULT_RELAXED_THRESHOLD",
    "TargetCaptionRate",
    "is_target_caption",
    "target_bleu4",
]
