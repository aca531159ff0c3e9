"""Decoder pretraining: a ``GPT2LMHeadModel`` of a captioner preset's decoder config learns caption text.

Causal language modelling on the training captions, laid out exactly as the captioner's decoder sees them (``<bos>``
then the words, predicting the words then ``<eos>``), with the word-level tokenizer the captioner would build from
the same captions. The model has no cross-attention: it knows the language, not the images, as ``gpt2`` does; loading
it into a captioner adds new cross-attention.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from datamodules.errors import RobucapError
from datamodules.pretraining import TextBatch
from datamodules.tokenizer import VocabInfo, tokenizer_from_state, tokenizer_to_state
from modules.captioners.base import caption_loss
from modules.captioners.vit_gpt2 import PRESETS
from modules.checkpoint import same_tokenizer
from modules.pretraining.base import PretrainingModule, check_optimiser_settings, check_preset

__all__ = ["DecoderPretraining"]

TOKENIZER_KEY = "robucap_pretraining_tokenizer"
"""Checkpoint entry holding the tokenizer as plain JSON (the model's size depends on it)."""


class DecoderPretraining(PretrainingModule):
    """Causal language modelling of captions with the decoder of a ViT-GPT2 preset; exports the ``GPT2LMHeadModel``
    and its tokenizer.

    The model is built once the tokenizer is known (the data module's, or the checkpoint's). Logs ``train/loss``,
    ``val/loss`` (cross-entropy per token, ``<eos>`` included) and ``val/perplexity`` (its exponential; a model that
    knows nothing scores the vocabulary size).

    Args:
        preset: The captioner preset whose decoder config is used (``tiny`` or ``base``).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` or ``constant`` after the warm-up.
        min_lr_ratio: Final learning rate of the cosine schedule, as a fraction of ``lr``.
        export_dir: Where the trained ``GPT2LMHeadModel`` and the tokenizer are saved when training ends (``None``:
            ``<trainer.default_root_dir>/pretrained``).
    """

    kind = "decoder_pretraining"

    def __init__(
        self,
        preset: str = "tiny",
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optimiser_settings(lr, weight_decay, warmup_steps, schedule, min_lr_ratio)
        check_preset(preset)
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.decoder: GPT2LMHeadModel | None = None
        self._val_nll = 0.0
        self._val_tokens = 0

    def setup(self, stage: str) -> None:
        """Take the data module's tokenizer, or give it the checkpoint's.

        Raises:
            RobucapError: No tokenizer anywhere, or the data's differs from the checkpoint's.
        """
        # Lightning sets the data module up before the module, so its tokenizer is there.
        datamodule = getattr(self.trainer, "datamodule", None)
        data_tokenizer = getattr(datamodule, "tokenizer", None)
        if self.tokenizer is None:
            if data_tokenizer is None:
                raise RobucapError("no tokenizer: use datamodules.pretraining.CaptionTextDataModule or a checkpoint")
            self.tokenizer = data_tokenizer
        elif data_tokenizer is not None and not same_tokenizer(self.tokenizer, data_tokenizer):
            raise RobucapError(
                "the data's tokenizer differs from the checkpoint's; the decoder's weights only work with its own "
                "tokenizer: pass data.tokenizer=<the run's pretrained directory>"
            )

    def configure_model(self) -> None:
        # Without a tokenizer (load_from_checkpoint calls this hook first) the build waits for on_load_checkpoint.
        if self.decoder is not None or self.tokenizer is None:
            return
        vocab = VocabInfo.from_tokenizer(self.tokenizer)
        config = GPT2Config(
            vocab_size=vocab.vocab_size,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            pad_token_id=vocab.pad_token_id,
            **PRESETS[self.hparams.preset]["decoder"],
        )
        self.decoder = GPT2LMHeadModel(config)

    def forward(self, batch: TextBatch) -> torch.Tensor:
        """Next-token logits.

        Shape:
            ``(B, T)`` ids in, ``(B, T, V)`` logits out.
        """
        if self.decoder is None:
            raise RuntimeError("the decoder is built in configure_model(), once the tokenizer is known")
        return self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def training_step(self, batch: TextBatch, batch_idx: int) -> torch.Tensor:
        loss = caption_loss(self(batch), batch.labels)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        self.log("train/epoch_loss", loss, batch_size=len(batch), on_step=False, on_epoch=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_nll = 0.0
        self._val_tokens = 0

    def validation_step(self, batch: TextBatch, batch_idx: int) -> None:
        self._val_nll += float(caption_loss(self(batch), batch.labels, reduction="sum"))
        self._val_tokens += int(batch.labels.ne(-100).sum())

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole split (and every rank), so the perplexity does not depend on batching.
        totals = self.all_gather(torch.tensor([self._val_nll, float(self._val_tokens)], dtype=torch.float64))
        nll, tokens = totals.reshape(-1, 2).sum(0).tolist()
        loss = nll / max(tokens, 1.0)
        self.log("val/loss", loss)
        self.log("val/perplexity", math.exp(loss), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TOKENIZER_KEY] = tokenizer_to_state(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokenizer = tokenizer_from_state(checkpoint[TOKENIZER_KEY])
        self.configure_model()

    def save_pretrained(self, directory: Path) -> None:
        """The ``GPT2LMHeadModel`` (config + weights) and the tokenizer, the files of a ``gpt2`` directory: a
        captioner reads the tokenizer with ``data.tokenizer=<directory>``."""
        if self.decoder is None or self.tokenizer is None:
            raise RuntimeError("nothing to export: the decoder was never built")
        self.decoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
