"""Show, Attend and Tell (Xu et al., 2015): CNN annotation vectors + soft-attention LSTM, the victim of Li et al. 2022.

Li et al. 2022 trains the PyTorch implementation of sgrvinod (ResNet-101 pooled to 14×14, embedding, attention and LSTM
sizes 512, dropout 0.5, doubly stochastic attention regularisation with ``alpha_c = 1``): that is the ``standard``
preset. ``tiny`` is a small ResNet with a stride-1 stem for 32–64 px images (see
:func:`~modules.captioners.cnn_encoder.tiny_resnet_trunk`).

The training loss adds Xu et al.'s doubly stochastic attention term to the cross-entropy:
``loss = CE + alpha_c · mean_{b,i} (1 − Σ_t α_bti)²``, with the sum over the caption's non-padding steps and the mean
over images and grid positions (the reference implementation's scaling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.captioners.attention_lstm import AttentionLSTMDecoder
from modules.captioners.base import (
    BEAM_EARLY_STOPPING,
    BEAM_LENGTH_PENALTY,
    Captioner,
    CaptionerOutput,
    ImageNormalize,
    caption_loss,
    shift_right,
)
from modules.captioners.beam_search import BeamSearchResult, DecoderState, beam_search
from modules.captioners.cnn_encoder import (
    BACKBONES,
    TINY_BACKBONE,
    CNNEncoder,
    tiny_resnet_trunk,
    torchvision_resnet_trunk,
)
from modules.captioners.settings import CaptionerSettings

# torchvision's ImageNet statistics: what its pretrained ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ShowAttendTellConfig:
    """Shape and loss options of a Show-Attend-Tell captioner.

    Attributes:
        backbone: ``tiny_resnet`` or a torchvision ResNet name (``resnet18`` ... ``resnet152``).
        widths: Stem and stage widths of ``tiny_resnet`` (ignored by torchvision ResNets).
        blocks: Blocks per stage of ``tiny_resnet`` (ignored by torchvision ResNets).
        grid_size: Side of the attention grid; ``None`` keeps the trunk's own output grid (``image_size / stride``).
        embed_dim: Word embedding size.
        attention_dim: Attention space size.
        hidden_dim: LSTM state size.
        dropout: Dropout before the output layer.
        deep_output: Xu et al.'s deep output layer (``False``: logits from the LSTM state alone).
        alpha_c: Weight of the doubly stochastic attention regulariser (0 disables it).
    """

    backbone: str = TINY_BACKBONE
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (1, 1, 1)
    grid_size: int | None = None
    embed_dim: int = 64
    attention_dim: int = 64
    hidden_dim: int = 128
    dropout: float = 0.1
    deep_output: bool = True
    alpha_c: float = 1.0


PRESETS: dict[str, ShowAttendTellConfig] = {
    # 0.27 M parameters with a 50-word vocabulary (encoder 78 k); a 4×4 attention grid at 32 px, 8×8 at 64 px.
    "tiny": ShowAttendTellConfig(),
    # Li et al.'s (2022) victim (sgrvinod's implementation): ResNet-101, 14×14 grid, sizes 512, dropout 0.5; 224/256 px.
    "standard": ShowAttendTellConfig(
        backbone="resnet101", grid_size=14, embed_dim=512, attention_dim=512, hidden_dim=512, dropout=0.5
    ),
}
ENCODER_FIELDS = ("backbone", "widths", "blocks", "grid_size")
DECODER_FIELDS = ("embed_dim", "attention_dim", "hidden_dim", "dropout", "deep_output", "alpha_c")


class ShowAttendTellCaptioner(Captioner):
    """CNN encoder + attention LSTM decoder behind the :class:`Captioner` interface.

    Args:
        image_encoder: Normalised images to annotation vectors.
        caption_decoder: Annotation vectors and previous words to next-word logits.
        vocab: Tokenizer ids (pad, bos = decoder start, eos).
        image_size: Input side in pixels.
        alpha_c: Weight of the doubly stochastic attention regulariser in ``loss``.
        mean: Per-channel mean of the normalisation applied inside the model.
        std: Per-channel standard deviation of that normalisation.
    """

    def __init__(
        self,
        image_encoder: CNNEncoder,
        caption_decoder: AttentionLSTMDecoder,
        vocab: VocabInfo,
        image_size: int,
        alpha_c: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.caption_decoder = caption_decoder
        self.vocab = vocab
        self.image_size = image_size
        self.alpha_c = alpha_c
        self.normalize = ImageNormalize(mean, std)

    @property
    def encoder(self) -> nn.Module:
        return self.image_encoder

    @property
    def decoder(self) -> nn.Module:
        return self.caption_decoder

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Annotation vectors of [0, 1] images.

        Shape:
            ``(B, 3, H, W)`` in, ``(B, L, D)`` out.
        """
        return self.image_encoder(self.normalize(pixel_values))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> CaptionerOutput:
        """Teacher-forced logits; loss = cross-entropy + ``alpha_c`` × doubly stochastic attention term.

        Shape:
            ``pixel_values``: ``(B, 3, H, W)`` in [0, 1]; ``labels``: ``(B, T)``; logits ``(B, T, V)``,
            attention ``(B, T, L)``.
        """
        input_ids = shift_right(labels, self.vocab.bos_token_id, self.vocab.pad_token_id)
        logits, attention = self.caption_decoder(self.encode(pixel_values), input_ids)
        loss = caption_loss(logits, labels)
        if self.alpha_c:
            loss = loss + self.alpha_c * attention_penalty(attention, labels)
        return CaptionerOutput(logits=logits, loss=loss, attention=attention)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        length_penalty: float = BEAM_LENGTH_PENALTY,
    ) -> torch.Tensor:
        if num_beams == 1:
            return self.greedy_search(pixel_values, max_new_tokens)
        return self.beam_search(pixel_values, max_new_tokens, num_beams, length_penalty=length_penalty).sequences

    @torch.no_grad()
    def greedy_search(self, pixel_values: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Most likely next word at every step, until every caption has ended or ``max_new_tokens``.

        Shape:
            ``(B, 3, H, W)`` in; ``(B, T)`` token ids out (no start token, pad after EOS, ``T <= max_new_tokens``).
        """
        features = self.encode(pixel_values)
        projected = self.caption_decoder.attention.project(features)
        state = self.caption_decoder.init_state(features)
        tokens = torch.full((features.shape[0],), self.vocab.bos_token_id, dtype=torch.long, device=features.device)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        steps = []
        for _ in range(max_new_tokens):
            logits, _, state = self.caption_decoder.step(features, projected, tokens, state)
            tokens = logits.argmax(dim=-1).masked_fill(finished, self.vocab.pad_token_id)
            steps.append(tokens)
            finished = finished | tokens.eq(self.vocab.eos_token_id)
            if finished.all():
                break
        return torch.stack(steps, dim=1)

    @torch.no_grad()
    def beam_search(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 3,
        length_penalty: float = BEAM_LENGTH_PENALTY,
        early_stopping: bool = BEAM_EARLY_STOPPING,
    ) -> BeamSearchResult:
        """Beam search as ViT-GPT2's transformers ``generate`` does it, so ``num_beams`` means the same for both.

        Finished captions score ``sum_logprobs / length ** length_penalty`` (length: generated tokens, EOS
        included); see :mod:`modules.captioners.beam_search` for the stopping rule.

        Shape:
            ``(B, 3, H, W)`` in; token ids ``(B, T)`` (no start token, pad after EOS), scores and lengths ``(B,)`` out.
        """
        if num_beams < 1:
            raise RobucapError(f"num_beams must be >= 1, got {num_beams}")
        features = self.encode(pixel_values).repeat_interleave(num_beams, dim=0)
        projected = self.caption_decoder.attention.project(features)

        def step(tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
            # Hypotheses only move between the beams of one image, so features need no reordering.
            logits, _, (h, c) = self.caption_decoder.step(features, projected, tokens, (state[0], state[1]))
            return logits.float().log_softmax(dim=-1), (h, c)

        return beam_search(
            step,
            self.caption_decoder.init_state(features),
            batch_size=pixel_values.shape[0],
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            bos_token_id=self.vocab.bos_token_id,
            eos_token_id=self.vocab.eos_token_id,
            pad_token_id=self.vocab.pad_token_id,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )


def attention_penalty(attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Doubly stochastic attention regulariser: every grid position should get about one unit of attention in total.

    Args:
        attention: Attention weights per step. Shape: ``(B, T, L)``.
        labels: Shape: ``(B, T)``, -100 on padding; padded steps do not count.

    Returns:
        ``mean_{b,i} (1 − Σ_t α_bti)²``, a scalar.
    """
    # float32: under bf16 autocast the sum over a long caption would lose the small differences that matter here.
    total = (attention.float() * labels.ne(-100).unsqueeze(2)).sum(dim=1)
    return (1.0 - total).pow(2).mean()


def _apply_overrides(config: ShowAttendTellConfig, overrides: dict[str, Any]) -> ShowAttendTellConfig:
    """Flat ``{field: value}`` or grouped ``{"encoder": {...}, "decoder": {...}}`` (the form ``vit_gpt2`` uses)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        group = {"encoder": ENCODER_FIELDS, "decoder": DECODER_FIELDS}.get(key)
        if group is not None and isinstance(value, dict):
            wrong = sorted(set(value) - set(group))
            if wrong:
                raise RobucapError(f"show_attend_tell {key} overrides accept {list(group)}, got {wrong}")
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(ENCODER_FIELDS) - set(DECODER_FIELDS))
    if unknown:
        raise RobucapError(
            f"unknown show_attend_tell override {unknown}; allowed fields: {[*ENCODER_FIELDS, *DECODER_FIELDS]}"
        )
    for key in ("widths", "blocks"):
        if key in flat and isinstance(flat[key], list):
            flat[key] = tuple(flat[key])
    return dataclasses.replace(config, **flat)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate(config: ShowAttendTellConfig, image_size: int) -> None:
    """Reject option values that would fail later with a bare PyTorch error, naming the field."""
    if config.backbone not in BACKBONES:
        raise RobucapError(f"show_attend_tell backbone must be one of {list(BACKBONES)}, got {config.backbone!r}")
    sizes = {k: getattr(config, k) for k in ("embed_dim", "attention_dim", "hidden_dim")}
    if config.grid_size is not None:
        sizes["grid_size"] = config.grid_size
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RobucapError(f"show_attend_tell {key} must be an integer >= 1, got {value!r}")
    if config.backbone == TINY_BACKBONE:
        sequences = (config.widths, config.blocks)
        if (
            not config.widths
            or len(config.widths) != len(config.blocks)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for seq in sequences for v in seq)
        ):
            raise RobucapError(
                "show_attend_tell widths and blocks must be lists of integers >= 1 of the same length, got "
                f"{list(config.widths)} and {list(config.blocks)}"
            )
    if not _is_number(config.dropout) or not 0.0 <= config.dropout < 1.0:
        raise RobucapError(f"show_attend_tell dropout must be in [0, 1), got {config.dropout!r}")
    if not _is_number(config.alpha_c) or not config.alpha_c >= 0.0:
        raise RobucapError(f"show_attend_tell alpha_c must be >= 0, got {config.alpha_c!r}")
    stride = 2 ** len(config.widths) if config.backbone == TINY_BACKBONE else 32
    if image_size < stride:
        raise RobucapError(f"image_size {image_size} is smaller than the {config.backbone} encoder's stride {stride}")


@dataclass(frozen=True)
class ShowAttendTellSettings(CaptionerSettings):
    """Show-Attend-Tell (``model.captioner`` with
    ``class_path: modules.captioners.show_attend_tell.ShowAttendTellSettings``).

    Attributes:
        preset: ``tiny`` or ``standard`` (see :data:`PRESETS`).
        encoder_weights: Local state_dict (``torch.save`` or ``.safetensors``) of the backbone, e.g. a torchvision
            ResNet-101 classifier's (its ``fc.*`` keys are ignored).
        overrides: :class:`ShowAttendTellConfig` fields to change, grouped as ``{"encoder": {...}, "decoder":
            {...}}`` (:data:`ENCODER_FIELDS`, :data:`DECODER_FIELDS`) or flat.
    """

    name = "show_attend_tell"
    preset: str = "tiny"
    encoder_weights: str | None = None
    overrides: dict[str, Any] | None = None

    def build(self, vocab: VocabInfo, image_size: int) -> ShowAttendTellCaptioner:
        return build_show_attend_tell(
            vocab, image_size, preset=self.preset, encoder_weights=self.encoder_weights, overrides=self.overrides
        )


def build_show_attend_tell(
    vocab: VocabInfo,
    image_size: int,
    preset: str = "tiny",
    encoder_weights: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ShowAttendTellCaptioner:
    """Build a randomly initialised Show-Attend-Tell captioner, optionally with a local pretrained encoder.

    Args:
        vocab: Token ids of the tokenizer.
        image_size: Input side in pixels.
        preset: ``tiny`` or ``standard`` (see :data:`PRESETS`).
        encoder_weights: Local state_dict (``torch.save`` or ``.safetensors``) of the backbone, e.g. a torchvision
            ResNet-101 classifier's (its ``fc.*`` keys are ignored).
        overrides: :class:`ShowAttendTellConfig` fields to change, flat (``{"hidden_dim": 256}``) or grouped as
            ``{"encoder": {"grid_size": 7}, "decoder": {"hidden_dim": 256}}`` (:data:`ENCODER_FIELDS`,
            :data:`DECODER_FIELDS`).

    Raises:
        RobucapError: Unknown preset or override, bad option values, or an ``encoder_weights`` file that is missing
            or does not fit.
    """
    if preset not in PRESETS:
        raise RobucapError(f"unknown show_attend_tell preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = _apply_overrides(PRESETS[preset], overrides or {})
    _validate(config, image_size)
    if config.backbone == TINY_BACKBONE:
        trunk, channels, stride = tiny_resnet_trunk(config.widths, config.blocks)
    else:
        trunk, channels, stride = torchvision_resnet_trunk(config.backbone)
    grid = config.grid_size if config.grid_size is not None else image_size // stride
    encoder = CNNEncoder(trunk, channels, grid, config.backbone)
    if encoder_weights is not None:
        encoder.load_trunk_weights(encoder_weights)
    decoder = AttentionLSTMDecoder(
        vocab_size=vocab.vocab_size,
        encoder_dim=channels,
        embed_dim=config.embed_dim,
        attention_dim=config.attention_dim,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
        deep_output=config.deep_output,
    )
    return ShowAttendTellCaptioner(encoder, decoder, vocab, image_size, alpha_c=config.alpha_c)
