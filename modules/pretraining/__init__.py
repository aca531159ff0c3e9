"""Pretraining of a ViT-GPT2 captioner's parts apart, each saved as a ``save_pretrained`` directory.

* :class:`~modules.pretraining.encoder.EncoderPretraining`: a ``ViTModel`` learns the attributes of shapes images
  (multi-label: shapes, colours, sizes, colour-shape pairs, object count), never their captions.
* :class:`~modules.pretraining.decoder.DecoderPretraining`: a ``GPT2LMHeadModel`` learns caption text by causal
  language modelling, never the images.

``preset: pretrained`` with ``encoder_dir`` + ``decoder_dir`` (``modules/captioners/vit_gpt2.py``) joins them with new
cross-attention, as it would join ``google/vit-*`` and ``gpt2`` (docs/pretraining.md).
"""

from modules.pretraining.base import PretrainingModule
from modules.pretraining.decoder import DecoderPretraining
from modules.pretraining.encoder import EncoderPretraining

__all__ = ["DecoderPretraining", "EncoderPretraining", "PretrainingModule"]
