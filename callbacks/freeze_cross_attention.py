"""Freeze the language decoder but keep its cross-attention (and the encoder-to-decoder projection) trainable.

:class:`~callbacks.freeze.FreezeDecoder` freezes all of ``captioner.decoder``; for ViT-GPT2 that includes the
cross-attention layers that read the encoder. When the captioner starts from pretrained parts those layers are new
(randomly initialised), so freezing them leaves nothing trained that joins image and text. This variant is the other
way of assigning cross-attention: it belongs to neither frozen part and is trained with the encoder.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from callbacks.freeze import FreezeDecoder
from datamodules.errors import RobucapError

__all__ = ["FreezeDecoderKeepCrossAttention", "is_cross_attention"]

# Parameter-name pieces of the layers that join encoder and decoder (transformers' GPT-2 and VisionEncoderDecoder).
CROSS_ATTENTION_KEYS = ("crossattention", "ln_cross_attn", "enc_to_dec_proj")


def is_cross_attention(name: str) -> bool:
    """Whether a parameter name (``model.decoder.transformer.h.0.crossattention.c_attn.weight``) joins the parts."""
    return any(key in name for key in CROSS_ATTENTION_KEYS)


class FreezeDecoderKeepCrossAttention(FreezeDecoder):
    """As :class:`~callbacks.freeze.FreezeDecoder`, then make the cross-attention layers trainable again.

    The captioner must already be built (the studies build their modules before fitting): the parameters are
    unfrozen in ``setup``, before the optimizer is configured.

    Raises:
        RobucapError: The captioner is not built yet, or has no cross-attention parameters.
    """

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Freeze the decoder, then unfreeze its cross-attention."""
        super().freeze_before_training(pl_module)
        captioner: nn.Module | None = getattr(pl_module, "captioner", None)
        if captioner is None:
            raise RobucapError(f"{type(self).__name__} needs a captioner built before fitting (with_tokenizer)")
        found = False
        for name, param in captioner.named_parameters():
            if is_cross_attention(name):
                param.requires_grad = True
                found = True
        if not found:
            raise RobucapError(
                f"{type(self).__name__}: the captioner {type(captioner).__name__} has no cross-attention parameters "
                f"(names containing {' / '.join(CROSS_ATTENTION_KEYS)})"
            )
