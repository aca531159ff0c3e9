"""The exported model class: ``VisionEncoderDecoderModel`` with the training loss robucap computes.

transformers 4.57 builds the decoder inputs by shifting ``labels`` right and then scores the logits with
``ForCausalLMLoss``, which shifts the labels a second time (transformers issue #40111, fixed only in 5.x by PR
#40863, where the ``image-to-text`` pipeline is gone). The loss is then that of predicting the token after next.
This class scores logit ``t`` against label ``t``, as robucap's training does, so fine-tuning or attacking the
export through ``model(pixel_values=..., labels=...).loss`` gets the right value and gradients.
"""

from __future__ import annotations

from typing import Any

from transformers import VisionEncoderDecoderModel

__all__ = ["RobucapVisionEncoderDecoderModel"]


class RobucapVisionEncoderDecoderModel(VisionEncoderDecoderModel):
    """``VisionEncoderDecoderModel`` whose loss does not shift the (already shifted) labels again.

    Args:
        *args: As for ``VisionEncoderDecoderModel``.
        **kwargs: As for ``VisionEncoderDecoderModel``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # transformers picks the loss by this name: "ForMaskedLM" is cross-entropy of logits[t] against labels[t]
        # over the labels that are not -100, with no shift (the decoder inputs are already labels shifted right).
        self.loss_type = "ForMaskedLM"
