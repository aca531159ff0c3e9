"""The freeze study's pretrained-parts regime: where the parts come from, and which parameters each phase trains.

``--study.start pretrained`` starts every phase from a ViT encoder and a GPT-2 decoder pretrained separately
(docs/pretraining.md), joined by new cross-attention, as Rashid & Rivas (2024) start from ``google/vit-*`` and
``gpt2``. The parts are either given (``--study.encoder_dir`` / ``--study.decoder_dir``, ``save_pretrained``
directories) or made here by the two pretraining tasks under ``<out>/parts``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from callbacks.freeze_cross_attention import is_cross_attention
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.pretraining import CaptionTextDataModule, ShapesAttributesDataModule, generated_shapes_options
from datamodules.tokenizer import load_tokenizer
from modules.checkpoint import same_tokenizer
from modules.pretraining.decoder import DecoderPretraining
from modules.pretraining.encoder import EncoderPretraining

__all__ = ["GROUPS", "Parts", "ParameterGroups", "check_part_dirs", "make_parts", "parameter_groups", "resolve_parts"]

GROUPS = ("encoder", "embeddings", "decoder_blocks", "cross_attention", "projection", "lm_head")
"""Parameter groups counted per phase: the vision encoder; the decoder's token and position embeddings; its
self-attention and MLP blocks (layer norms included); cross-attention (with its layer norms); the encoder-to-decoder
projection (absent when the widths match, as in the ``tiny`` preset); the output layer."""


@dataclass
class Parts:
    """The pretrained parts a regime starts from.

    Attributes:
        encoder_dir: ``save_pretrained`` directory of the ViT.
        decoder_dir: ``save_pretrained`` directory of GPT-2 and its tokenizer.
        made_here: The study pretrained them itself (else they were given).
        settings: The pretraining settings when made here (epochs, learning rate, batch size).
        seconds: Wall time of the two pretraining runs (0 when given).
    """

    encoder_dir: str
    decoder_dir: str
    made_here: bool
    settings: dict[str, Any]
    seconds: float = 0.0


def _model_type(directory: Path, option: str) -> str:
    config = directory / "config.json"
    if not directory.is_dir() or not config.is_file():
        raise RobucapError(f"{option} {directory} is not a save_pretrained directory (no config.json there)")
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RobucapError(f"{option}: {config} is not valid JSON: {err}") from err


def check_part_dirs(encoder_dir: str | None, decoder_dir: str | None) -> None:
    """Refuse one directory without the other, missing directories and swapped ones.

    Raises:
        RobucapError: Naming the option at fault.
    """
    if (encoder_dir is None) != (decoder_dir is None):
        raise RobucapError("--study.encoder_dir and --study.decoder_dir go together: give both, or neither")
    if encoder_dir is None or decoder_dir is None:
        return
    for option, directory, expected, label in (
        ("--study.encoder_dir", encoder_dir, "vit", "a ViT"),
        ("--study.decoder_dir", decoder_dir, "gpt2", "GPT-2"),
    ):
        kind = _model_type(Path(directory), option)
        if kind != expected:
            found = kind or "unknown"
            raise RobucapError(f"{option} {directory} holds a {found!r} model; expected {label} ({expected!r})")


def _fit(module: L.LightningModule, data: L.LightningDataModule, out: Path, name: str, epochs: float) -> None:
    whole = epochs >= 1
    trainer = L.Trainer(
        max_epochs=int(round(epochs)) if whole else 1,
        limit_train_batches=1.0 if whole else float(epochs),
        logger=CSVLogger(save_dir=str(out / "logs"), name=name, version=""),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out / name),
    )
    trainer.fit(module, datamodule=data)


def make_parts(datamodule: CaptionDataModule, out: Path, settings: dict[str, Any]) -> Parts:
    """Pretrain the encoder (shapes attributes) and the decoder (caption text) on the study's training split.

    The decoder uses the study's tokenizer, so its vocabulary is the captioner's.

    Args:
        datamodule: The study's data, set up (its tokenizer is built): ``shapes`` data, or a generated shapes dataset
            read as another format (the demo reads its shapes data as ``coco``).
        out: The study's directory; the parts go to ``out/parts/{encoder,decoder}``.
        settings: ``encoder_epochs``, ``decoder_epochs``, ``lr``, ``batch_size`` (recorded in the result).

    Raises:
        RobucapError: The data is not a generated shapes dataset (the encoder's labels come from the shapes
            instances files).
    """
    shapes = _shapes_options(datamodule)
    parts = Path(out) / "parts"
    tokenizer_dir = parts / "tokenizer"
    datamodule.tokenizer.save_pretrained(tokenizer_dir)
    start = time.perf_counter()
    print(f"[freeze study] pretraining the parts: encoder {settings['encoder_epochs']}, decoder "
          f"{settings['decoder_epochs']} epoch(s)")  # fmt: skip
    encoder = EncoderPretraining(
        image_size=datamodule.image_size, lr=settings["lr"], export_dir=str(parts / "encoder"), warmup_steps=20
    )
    images = ShapesAttributesDataModule(
        root=str(datamodule.root), image_size=datamodule.image_size, batch_size=settings["batch_size"],
        shapes=shapes, progress=False,
    )  # fmt: skip
    _fit(encoder, images, parts, "pretrain_encoder", settings["encoder_epochs"])
    decoder = DecoderPretraining(lr=settings["lr"], export_dir=str(parts / "decoder"), warmup_steps=20)
    text = CaptionTextDataModule(
        root=str(datamodule.root), batch_size=settings["batch_size"], tokenizer=str(tokenizer_dir), shapes=shapes,
        progress=False,
    )  # fmt: skip
    _fit(decoder, text, parts, "pretrain_decoder", settings["decoder_epochs"])
    seconds = round(time.perf_counter() - start, 1)
    return Parts(str(parts / "encoder"), str(parts / "decoder"), True, dict(settings), seconds)


def _shapes_options(datamodule: CaptionDataModule) -> dict[str, Any]:
    """The generator settings of the study's shapes data, however the study reads it.

    Raises:
        RobucapError: The data is neither ``shapes`` nor a generated shapes dataset read as another format.
    """
    if datamodule.format == "shapes":
        return {**datamodule.shapes_options, "image_size": datamodule.image_size}
    # Shapes data read as COCO (the demo's) carries the same instances files; its meta.json says how it was made.
    recorded = generated_shapes_options(datamodule.root)
    if recorded is None:
        raise RobucapError(
            f"--study.start pretrained without --study.encoder_dir / --study.decoder_dir pretrains the encoder on "
            f"shapes attributes, but the data ({datamodule.format!r} at {datamodule.root}) is not a generated shapes "
            "dataset: pass pretrained directories"
        )
    return recorded


def resolve_parts(
    datamodule: CaptionDataModule, out: Path, encoder_dir: str | None, decoder_dir: str | None, settings: dict[str, Any]
) -> Parts:
    """The given parts (checked against the data's tokenizer), else parts made by :func:`make_parts`.

    Raises:
        RobucapError: Bad directories, or a decoder whose tokenizer is not the data's.
    """
    check_part_dirs(encoder_dir, decoder_dir)
    if encoder_dir is None or decoder_dir is None:
        return make_parts(datamodule, out, settings)
    if not same_tokenizer(load_tokenizer(decoder_dir), datamodule.tokenizer):
        raise RobucapError(
            f"--study.decoder_dir {decoder_dir} has another tokenizer than the study's data; its weights only work "
            "with its own vocabulary (pretrain it on this data's training captions)"
        )
    return Parts(encoder_dir, decoder_dir, False, {})


def parameter_groups(captioner: nn.Module, new: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Parameters of each group of :data:`GROUPS` (elements), how many are trainable now, and whether it is new.

    Args:
        captioner: The captioner (after any freezing).
        new: Groups initialised at random when the parts were joined (``cross_attention``, ``projection``).
    """
    encoder_ids = {id(p) for p in captioner.encoder.parameters()}  # type: ignore[union-attr]
    counts = {g: {"params": 0, "trainable": 0, "new": g in new} for g in GROUPS}
    for name, param in captioner.named_parameters():
        if id(param) in encoder_ids:
            group = "encoder"
        elif "enc_to_dec_proj" in name:
            group = "projection"
        elif is_cross_attention(name):
            group = "cross_attention"
        elif ".wte." in name or ".wpe." in name or "embedding" in name:
            group = "embeddings"
        elif "lm_head" in name:
            group = "lm_head"
        else:
            group = "decoder_blocks"
        counts[group]["params"] += param.numel()
        counts[group]["trainable"] += param.numel() if param.requires_grad else 0
    return counts


class ParameterGroups(L.Callback):
    """Record :func:`parameter_groups` when fitting starts, after the freeze callbacks have acted."""

    def __init__(self, new: frozenset[str] = frozenset()) -> None:
        self.new = new
        self.counts: dict[str, dict[str, Any]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts = parameter_groups(pl_module.captioner, self.new)
