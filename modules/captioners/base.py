"""The captioner interface that training, freezing, attacks and metrics rely on (see the README, "Models")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo

# What ``num_beams > 1`` means for every captioner: transformers' beam search with its default settings. A finished
# caption scores (summed log-probabilities) / (generated tokens, EOS included) ** BEAM_LENGTH_PENALTY, and with
# BEAM_EARLY_STOPPING False the search goes on while an open hypothesis could still beat the worst kept caption.
# ViT-GPT2 passes these to ``generate`` (overriding a checkpoint's generation_config); Show-Attend-Tell's own search
# (modules/captioners/beam_search.py) follows the same rule.
BEAM_LENGTH_PENALTY: float = 1.0
BEAM_EARLY_STOPPING: bool = False


@dataclass
class CaptionerOutput:
    """Teacher-forced result.

    Attributes:
        logits: Next-token logits. Shape: ``(B, T, V)``.
        loss: Training loss (scalar): the mean cross-entropy over the non-padding label positions, plus the
            architecture's own regulariser if it has one (Show-Attend-Tell's doubly stochastic attention term).
            The pure cross-entropy is always ``caption_loss(logits, labels)``.
        attention: Attention weights over the image positions, for captioners that attend to a grid
            (Show-Attend-Tell); ``None`` otherwise. Shape: ``(B, T, L)``.
    """

    logits: torch.Tensor
    loss: torch.Tensor
    attention: torch.Tensor | None = None


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of teacher-forced logits against labels (padding = -100).

    Args:
        logits: Shape: ``(B, T, V)``.
        labels: Shape: ``(B, T)``, -100 where padded.
        reduction: ``"mean"`` over all label tokens of the batch, or ``"none"`` for one mean per caption ``(B,)``
            (what per-image attacks need), or ``"sum"``.

    Returns:
        The loss, a scalar or shape ``(B,)``.
    """
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    mask = labels.ne(-100)
    if reduction == "none":
        return (token_loss * mask).sum(1) / mask.sum(1).clamp_min(1)
    if reduction == "sum":
        return (token_loss * mask).sum()
    return (token_loss * mask).sum() / mask.sum().clamp_min(1)


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: the start token, then the labels shifted right, pad where labels are -100.

    Shape:
        ``(B, T)`` in, ``(B, T)`` out.
    """
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted.eq(-100), pad)


class ImageNormalize(nn.Module):
    """Maps [0, 1] pixels to the network's input statistics, so attacks can stay in pixel space.

    Shape:
        ``(B, 3, H, W)`` in, same shape out.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return (pixel_values - self.mean.to(pixel_values.dtype)) / self.std.to(pixel_values.dtype)


class Captioner(nn.Module, ABC):
    """An image captioner on [0, 1] images with two named parts.

    Subclasses own their normalisation and expose ``encoder`` (vision) and ``decoder`` (language model, including
    cross-attention and any encoder-to-decoder projection). Everything outside ``modules/captioners`` uses only
    this interface; a captioner is built from its settings (:mod:`modules.captioners.settings`), and brings its
    own weight-decay exemptions (:meth:`no_weight_decay`) and export support (:meth:`transformers_model`).

    Attributes:
        image_size: Side of the square input images in pixels.
        vocab: Token ids of the tokenizer the captioner was built for.
    """

    image_size: int
    vocab: VocabInfo

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of the parameters AdamW must not decay.

        The default exempts biases and normalisation parameters (fewer than 2 dimensions) and the weights of
        ``nn.Embedding`` layers; a captioner whose embeddings are stored otherwise overrides this.
        """
        names = {name for name, param in self.named_parameters() if param.ndim < 2}
        for prefix, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                names.add(f"{prefix}.weight" if prefix else "weight")
        return names

    def transformers_model(self) -> PreTrainedModel:
        """The transformers model ``robucap export`` saves; by default a captioner has none.

        Raises:
            RobucapError: This captioner cannot be exported to transformers.
        """
        raise RobucapError(
            f"the {type(self).__name__} captioner cannot be exported to transformers (it is not a transformers "
            "model); caption with robucap predict instead"
        )

    @property
    @abstractmethod
    def encoder(self) -> nn.Module:
        """The vision part."""

    @property
    @abstractmethod
    def decoder(self) -> nn.Module:
        """The language part, including cross-attention and any encoder-to-decoder projection."""

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> CaptionerOutput:
        """Teacher-forced logits and loss.

        Args:
            pixel_values: Shape: ``(B, 3, H, W)`` in [0, 1].
            labels: Shape: ``(B, T)``: caption tokens followed by EOS, -100 on padding.
        """

    @abstractmethod
    def generate(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        length_penalty: float = BEAM_LENGTH_PENALTY,
    ) -> torch.Tensor:
        """Greedy (``num_beams=1``) or beam-search captions.

        Args:
            pixel_values: Shape: ``(B, 3, H, W)`` in [0, 1].
            max_new_tokens: Longest caption in tokens, EOS included.
            num_beams: Beam width; beam search is length-normalised as in transformers.
            length_penalty: A finished beam scores ``sum_logprobs / length ** length_penalty`` (length: generated
                tokens, EOS included); 0 ranks by the summed log-probabilities. Ignored by greedy decoding.

        Returns:
            Token ids without the start token, padded with ``vocab.pad_token_id`` after EOS. Shape: ``(B, T)``.
        """
