"""ViT encoder + GPT-2 decoder through ``transformers.VisionEncoderDecoderModel`` (Rashid & Rivas 2024's captioner)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, PreTrainedModel, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo
from modules.captioners.base import (
    BEAM_EARLY_STOPPING,
    BEAM_LENGTH_PENALTY,
    Captioner,
    CaptionerOutput,
    ImageNormalize,
    caption_loss,
    shift_right,
)
from modules.captioners.settings import CaptionerSettings

# ViT checkpoints (google/vit-*) are trained on inputs normalised with mean = std = 0.5.
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "encoder": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "patch_size": 8,
        },
        # 320 positions: transformers' image-to-text pipeline asks for up to 256 new tokens by default.
        "decoder": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 320},
    },
    # ViT-B/16 and GPT-2 124M shapes, randomly initialised.
    "base": {
        "encoder": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
        },
        "decoder": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
    },
}


class ViTGPT2Captioner(Captioner):
    """``VisionEncoderDecoderModel`` behind the :class:`Captioner` interface.

    Args:
        model: The wrapped model; its decoder vocabulary must match ``vocab``.
        vocab: Tokenizer ids (pad, bos = decoder start, eos).
        mean: Per-channel mean of the normalisation applied inside the model.
        std: Per-channel standard deviation of that normalisation.
    """

    def __init__(
        self,
        model: VisionEncoderDecoderModel,
        vocab: VocabInfo,
        mean: tuple[float, float, float] = VIT_MEAN,
        std: tuple[float, float, float] = VIT_STD,
    ) -> None:
        super().__init__()
        decoder_vocab = model.config.decoder.vocab_size
        if decoder_vocab != vocab.vocab_size:
            raise RobucapError(
                f"the decoder has a vocabulary of {decoder_vocab} tokens but the tokenizer has {vocab.vocab_size}: "
                "use the decoder's own tokenizer (data.tokenizer=<its directory>) or a randomly initialised preset"
            )
        self.model = model
        self.vocab = vocab
        self.image_size = int(model.config.encoder.image_size)
        self.normalize = ImageNormalize(mean, std)
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id = vocab.bos_token_id
            cfg.pad_token_id = vocab.pad_token_id
            cfg.eos_token_id = vocab.eos_token_id
            cfg.bos_token_id = vocab.bos_token_id
        model.config.decoder.bos_token_id = vocab.bos_token_id
        model.config.decoder.eos_token_id = vocab.eos_token_id
        model.config.decoder.pad_token_id = vocab.pad_token_id

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def decoder(self) -> nn.Module:
        # GPT-2's cross-attention lives inside model.decoder; the projection exists only when hidden sizes differ.
        parts = [self.model.decoder]
        if getattr(self.model, "enc_to_dec_proj", None) is not None:
            parts.append(self.model.enc_to_dec_proj)
        return parts[0] if len(parts) == 1 else nn.ModuleList(parts)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> CaptionerOutput:
        decoder_input_ids = shift_right(labels, self.vocab.bos_token_id, self.vocab.pad_token_id)
        # Position t attends to the start token and labels[:t]; padding sits at the end, after the last label.
        attention_mask = torch.ones_like(decoder_input_ids)
        attention_mask[:, 1:] = labels[:, :-1].ne(-100)
        out = self.model(
            pixel_values=self.normalize(pixel_values),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=attention_mask,
            use_cache=False,
        )
        return CaptionerOutput(logits=out.logits, loss=caption_loss(out.logits, labels))

    def no_weight_decay(self) -> set[str]:
        """Biases, norms and every embedding: GPT-2's token and position tables (``wte``, ``wpe``) and ViT's patch
        projection, position embeddings and class token (all named ``*embed*``)."""
        embeddings = {name for name, _ in self.named_parameters() if any(k in name for k in ("embed", "wte", "wpe"))}
        return super().no_weight_decay() | embeddings

    def transformers_model(self) -> PreTrainedModel:
        """The wrapped ``VisionEncoderDecoderModel``, which ``robucap export`` saves."""
        return self.model

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        length_penalty: float = BEAM_LENGTH_PENALTY,
    ) -> torch.Tensor:
        # Every decoder position is real (finished captions continue with pad, which is cut below), so the mask is
        # all ones; generate() extends it step by step. Without it GPT-2 sees pad ids and warns about padding.
        start_mask = torch.ones(pixel_values.shape[0], 1, dtype=torch.long, device=pixel_values.device)
        tokens = self.model.generate(
            pixel_values=self.normalize(pixel_values),
            decoder_attention_mask=start_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            # Explicit, so a checkpoint's generation_config cannot change what num_beams means (Show-Attend-Tell's
            # beam search reads the same settings).
            length_penalty=length_penalty,
            early_stopping=BEAM_EARLY_STOPPING,
            decoder_start_token_id=self.vocab.bos_token_id,
            eos_token_id=self.vocab.eos_token_id,
            pad_token_id=self.vocab.pad_token_id,
        )[:, 1:]
        # transformers' beam search fills finished beams with `pad_token_id or eos`, i.e. with EOS when pad is id 0.
        is_eos = tokens.eq(self.vocab.eos_token_id).long()
        after_eos = (is_eos.cumsum(1) - is_eos).gt(0)
        return tokens.masked_fill(after_eos, self.vocab.pad_token_id)


@dataclass(frozen=True)
class ViTGPT2Settings(CaptionerSettings):
    """ViT encoder + GPT-2 decoder (``model.captioner`` with
    ``class_path: modules.captioners.vit_gpt2.ViTGPT2Settings``).

    Attributes:
        preset: ``tiny`` or ``base`` (random initialisation, see :data:`PRESETS`), or ``pretrained`` (local
            directories below).
        pretrained_dir: One full VisionEncoderDecoder ``save_pretrained`` directory (``preset: pretrained``).
        encoder_dir: A ViT directory (``preset: pretrained``, with ``decoder_dir``).
        decoder_dir: A GPT-2 directory (``preset: pretrained``, with ``encoder_dir``).
        overrides: Config fields changed in a random-init preset, ``{"encoder": {...}, "decoder": {...}}``.
    """

    name = "vit_gpt2"
    preset: str = "tiny"
    pretrained_dir: str | None = None
    encoder_dir: str | None = None
    decoder_dir: str | None = None
    overrides: dict[str, dict[str, Any]] | None = None

    def build(self, vocab: VocabInfo, image_size: int) -> ViTGPT2Captioner:
        return build_vit_gpt2(
            vocab,
            image_size,
            preset=self.preset,
            pretrained_dir=self.pretrained_dir,
            encoder_dir=self.encoder_dir,
            decoder_dir=self.decoder_dir,
            overrides=self.overrides,
        )


def build_vit_gpt2(
    vocab: VocabInfo,
    image_size: int,
    preset: str = "tiny",
    pretrained_dir: str | None = None,
    encoder_dir: str | None = None,
    decoder_dir: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> ViTGPT2Captioner:
    """Build a ViT-GPT2 captioner from a preset or from local pretrained directories.

    Args:
        vocab: Token ids of the tokenizer.
        image_size: Input side in pixels (must equal the pretrained encoder's for ``pretrained``).
        preset: ``tiny``, ``base`` (random init) or ``pretrained``.
        pretrained_dir: One full VisionEncoderDecoder directory (``pretrained`` only).
        encoder_dir: A ViT directory (``pretrained`` only, with ``decoder_dir``).
        decoder_dir: A GPT-2 directory (``pretrained`` only, with ``encoder_dir``).
        overrides: ``{"encoder": {...}, "decoder": {...}}`` config fields to change in a random-init preset.

    Raises:
        RobucapError: Unknown preset, or pretrained directories missing or of the wrong model type.
    """
    if preset == "pretrained":
        return _build_pretrained(vocab, image_size, pretrained_dir, encoder_dir, decoder_dir)
    if preset not in PRESETS:
        raise RobucapError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)} or 'pretrained'")
    if pretrained_dir or encoder_dir or decoder_dir:
        raise RobucapError(f"pretrained_dir / encoder_dir / decoder_dir need preset='pretrained', not {preset!r}")
    overrides = overrides or {}
    unknown = set(overrides) - {"encoder", "decoder"}
    if unknown:
        raise RobucapError(f"model overrides accept the keys 'encoder' and 'decoder', got {sorted(unknown)}")
    enc_kwargs = {**PRESETS[preset]["encoder"], **overrides.get("encoder", {})}
    dec_kwargs = {**PRESETS[preset]["decoder"], **overrides.get("decoder", {})}
    patch = enc_kwargs["patch_size"]
    if image_size % patch:
        raise RobucapError(f"image_size {image_size} is not a multiple of the ViT patch size {patch}")
    encoder = ViTConfig(image_size=image_size, **enc_kwargs)
    decoder = GPT2Config(
        vocab_size=vocab.vocab_size,
        bos_token_id=vocab.bos_token_id,
        eos_token_id=vocab.eos_token_id,
        pad_token_id=vocab.pad_token_id,
        add_cross_attention=True,
        is_decoder=True,
        **dec_kwargs,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.tie_word_embeddings = False
    return ViTGPT2Captioner(VisionEncoderDecoderModel(config=config), vocab)


def _model_type(directory: Path, role: str) -> str:
    if not directory.is_dir():
        raise RobucapError(f"{role} directory {directory} does not exist")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise RobucapError(f"{role} directory {directory} has no config.json (expected a save_pretrained directory)")
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RobucapError(f"{config_file} is not valid JSON: {err}") from err


def _build_pretrained(
    vocab: VocabInfo, image_size: int, pretrained_dir: str | None, encoder_dir: str | None, decoder_dir: str | None
) -> ViTGPT2Captioner:
    if pretrained_dir and (encoder_dir or decoder_dir):
        raise RobucapError("give either pretrained_dir or encoder_dir + decoder_dir, not both")
    if pretrained_dir:
        path = Path(pretrained_dir)
        kind = _model_type(path, "pretrained")
        if kind != "vision-encoder-decoder":
            raise RobucapError(
                f"pretrained directory {path} holds a {kind or 'unknown'!r} model; expected a VisionEncoderDecoder "
                "model (model_type 'vision-encoder-decoder')"
            )
        model = VisionEncoderDecoderModel.from_pretrained(str(path), local_files_only=True)
    elif encoder_dir and decoder_dir:
        enc_kind = _model_type(Path(encoder_dir), "encoder")
        dec_kind = _model_type(Path(decoder_dir), "decoder")
        if enc_kind != "vit":
            raise RobucapError(f"encoder directory {encoder_dir} holds a {enc_kind!r} model; expected a ViT ('vit')")
        if dec_kind != "gpt2":
            raise RobucapError(f"decoder directory {decoder_dir} holds a {dec_kind!r} model; expected GPT-2 ('gpt2')")
        with warnings.catch_warnings():
            # The new cross-attention weights are reported as "newly initialized": that is the point here.
            warnings.simplefilter("ignore")
            model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
                encoder_dir, decoder_dir, local_files_only=True
            )
    else:
        raise RobucapError("preset 'pretrained' needs pretrained_dir, or both encoder_dir and decoder_dir")
    # from_pretrained returns the model in eval mode; a captioner starts in training mode, as the presets do.
    model.train()
    expected = int(model.config.encoder.image_size)
    if expected != image_size:
        raise RobucapError(
            f"the pretrained encoder expects {expected} px images but data.image_size is {image_size}; "
            f"set data.image_size={expected}"
        )
    return ViTGPT2Captioner(model, vocab)
