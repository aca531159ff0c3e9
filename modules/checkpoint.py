"""Reading what a robucap checkpoint says about itself, without building a model or running pickled code.

Commands that start from a checkpoint (``validate``, ``test``, ``predict``, resuming ``fit``, ``export``,
``attack``) need its tokenizer, the captioner's construction settings and the data settings it was trained with
*before* any model exists, so that the model is built once, with the checkpoint's vocabulary and image size.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from datamodules.errors import RobucapError
from datamodules.tokenizer import tokenizer_from_state

TOKENIZER_KEY = "robucap_tokenizer"

# Settings that decide the captioner's parameter shapes: a checkpoint can only be loaded into a model built with
# the same values, so a command line that asks for others is a mistake, not an override.
ARCHITECTURE_KEYS = (
    "arch",
    "preset",
    "image_size",
    "overrides",
    "pretrained_dir",
    "encoder_dir",
    "decoder_dir",
    "encoder_weights",
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint records about the run that wrote it.

    Attributes:
        path: The checkpoint file.
        tokenizer: The caption tokenizer the captioner was trained with.
        model: The module's hyper-parameters (``CaptioningModule.__init__`` arguments).
        data: The data module's hyper-parameters (``CaptionDataModule.__init__`` arguments), empty when the
            checkpoint was written without a data module (e.g. ``trainer.save_checkpoint`` after a bare ``fit``).
        epoch: The epoch the checkpoint was written in.
        global_step: Optimizer steps taken when it was written.
    """

    path: Path
    tokenizer: PreTrainedTokenizerFast
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Read a robucap checkpoint's tokenizer and settings (tensors are memory-mapped, not loaded).

    Args:
        path: A ``.ckpt`` file written by ``robucap fit`` (or any Trainer running ``CaptioningModule``).

    Returns:
        The checkpoint's :class:`CheckpointInfo`.

    Raises:
        RobucapError: The file does not exist, cannot be read as a checkpoint, or was not written by robucap.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise RobucapError(f"checkpoint {path} {what}; expected a .ckpt file written by robucap fit")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; a truncated copy loses the central directory at its end.
        raise RobucapError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint archive (truncated, corrupt or another "
            "kind of file); expected a .ckpt file written by robucap fit"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        # torch reports a truncated zip, a foreign pickle or a non-checkpoint file through these types.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RobucapError(
            f"cannot read checkpoint {path} ({reason}); expected a .ckpt file written by robucap fit"
        ) from err
    if not isinstance(checkpoint, dict) or TOKENIZER_KEY not in checkpoint:
        raise RobucapError(f"checkpoint {path} was not written by robucap's CaptioningModule (no tokenizer inside)")
    model = dict(checkpoint.get("hyper_parameters") or {})
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return CheckpointInfo(
        path=path,
        tokenizer=tokenizer_from_state(checkpoint[TOKENIZER_KEY]),
        model=model,
        data=data,
        epoch=int(checkpoint.get("epoch", 0)),
        global_step=int(checkpoint.get("global_step", 0)),
    )


def same_tokenizer(a: PreTrainedTokenizerFast, b: PreTrainedTokenizerFast) -> bool:
    """Whether two tokenizers map every text to the same ids (same vocabulary, rules and special tokens)."""
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and a.special_tokens_map == b.special_tokens_map
