"""A toy captioner in one file: all that adding a captioner takes, with one YAML (tests/fixtures/toy_captioner.yaml).

A strided convolution pooled to one vector starts a GRU that writes the caption. It implements the
:class:`~modules.captioners.base.Captioner` interface, uses the shared beam search, and registers itself by defining
its settings dataclass; nothing else in robucap names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from datamodules.tokenizer import VocabInfo
from modules.captioners.base import (
    BEAM_LENGTH_PENALTY,
    Captioner,
    CaptionerOutput,
    ImageNormalize,
    caption_loss,
    shift_right,
)
from modules.captioners.beam_search import DecoderState, beam_search
from modules.captioners.settings import CaptionerSettings


class GRUDecoder(nn.Module):
    """Word embedding + GRU cell + output layer, started from the image vector.

    Args:
        vocab_size: Output words.
        hidden_dim: Embedding and state size.
    """

    def __init__(self, vocab_size: int, hidden_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_dim)
        self.cell = nn.GRUCell(hidden_dim, hidden_dim)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One word. Shape: tokens ``(B,)``, state ``(B, H)`` in; logits ``(B, V)``, state ``(B, H)`` out."""
        state = self.cell(self.embedding(tokens), state)
        return self.fc(state), state

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits. Shape: ``(B, T)`` ids and ``(B, H)`` state in, ``(B, T, V)`` out."""
        logits = []
        for t in range(input_ids.shape[1]):
            step_logits, state = self.step(input_ids[:, t], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


class ToyCaptioner(Captioner):
    """Conv encoder pooled to a vector + GRU decoder.

    Args:
        vocab: Tokenizer ids.
        image_size: Input side in pixels.
        hidden_dim: Channels of the image vector and GRU state size.
    """

    def __init__(self, vocab: VocabInfo, image_size: int, hidden_dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.image_size = image_size
        self.normalize = ImageNormalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.image_encoder = nn.Sequential(
            nn.Conv2d(3, hidden_dim, kernel_size=4, stride=4), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.caption_decoder = GRUDecoder(vocab.vocab_size, hidden_dim)

    @property
    def encoder(self) -> nn.Module:
        return self.image_encoder

    @property
    def decoder(self) -> nn.Module:
        return self.caption_decoder

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> CaptionerOutput:
        state = self.image_encoder(self.normalize(pixel_values))
        logits = self.caption_decoder(shift_right(labels, self.vocab.bos_token_id, self.vocab.pad_token_id), state)
        return CaptionerOutput(logits=logits, loss=caption_loss(logits, labels))

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        length_penalty: float = BEAM_LENGTH_PENALTY,
    ) -> torch.Tensor:
        state = self.image_encoder(self.normalize(pixel_values))
        if num_beams > 1:

            def step(tokens: torch.Tensor, beams: DecoderState) -> tuple[torch.Tensor, DecoderState]:
                logits, new_state = self.caption_decoder.step(tokens, beams[0])
                return logits.log_softmax(dim=-1), (new_state,)

            return beam_search(
                step,
                (state.repeat_interleave(num_beams, dim=0),),
                batch_size=pixel_values.shape[0],
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                bos_token_id=self.vocab.bos_token_id,
                eos_token_id=self.vocab.eos_token_id,
                pad_token_id=self.vocab.pad_token_id,
                length_penalty=length_penalty,
            ).sequences
        tokens = torch.full((state.shape[0],), self.vocab.bos_token_id, dtype=torch.long, device=state.device)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        steps = []
        for _ in range(max_new_tokens):
            logits, state = self.caption_decoder.step(tokens, state)
            tokens = logits.argmax(dim=-1).masked_fill(finished, self.vocab.pad_token_id)
            steps.append(tokens)
            finished = finished | tokens.eq(self.vocab.eos_token_id)
            if finished.all():
                break
        return torch.stack(steps, dim=1)


@dataclass(frozen=True)
class ToySettings(CaptionerSettings):
    """The toy captioner's options (``class_path: helpers.toy_captioner.ToySettings``).

    Attributes:
        hidden_dim: Channels of the image vector and GRU state size.
    """

    name = "toy_gru"
    hidden_dim: int = 48

    def build(self, vocab: VocabInfo, image_size: int) -> ToyCaptioner:
        return ToyCaptioner(vocab, image_size, self.hidden_dim)
