"""Reading what a robucap checkpoint says about itself, without building a model or running pickled code.

Commands that start from a checkpoint (``validate``, ``test``, ``predict``, resuming ``fit``, ``export``,
``attack``) need its tokenizer, the captioner's construction settings and the data settings it was trained with
*before* any model exists, so that the model is built once, with the checkpoint's vocabulary and image size.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from datamodules.errors import RobucapError
from datamodules.tokenizer import tokenizer_from_state
from modules.captioners import ARCHITECTURES, registered_captioners, resolve_captioner_settings

TOKENIZER_KEY = "robucap_tokenizer"

# Settings that decide the captioner's parameter shapes: a checkpoint can only be loaded into a model built with
# the same values, so a command line that asks for others is a mistake, not an override.
ARCHITECTURE_KEYS = ("captioner", "image_size")

# Checkpoints written before the captioner was injected as ``captioner: {class_path, init_args}`` name it with these
# flat model settings instead (every one of them is recorded, those of the other architecture as None).
LEGACY_CAPTIONER_KEYS = (
    "arch",
    "preset",
    "pretrained_dir",
    "encoder_dir",
    "decoder_dir",
    "overrides",
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
    model = upgrade_model_settings(checkpoint.get("hyper_parameters") or {}, f"checkpoint {path}")
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return CheckpointInfo(
        path=path,
        tokenizer=tokenizer_from_state(checkpoint[TOKENIZER_KEY]),
        model=model,
        data=data,
        epoch=int(checkpoint.get("epoch", 0)),
        global_step=int(checkpoint.get("global_step", 0)),
    )


def upgrade_model_settings(hparams: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint's model settings in today's form, with the captioner as ``{"class_path", "init_args"}``.

    Checkpoints from before captioners were injected record ``arch`` (``vit_gpt2`` or ``show_attend_tell``) and that
    architecture's options (``preset``, ``overrides``, ...) as flat settings; ``CaptioningModule`` no longer has
    those arguments, so Lightning would drop them and build the default captioner. They become the ``captioner``
    that builds the same network; settings already in today's form are returned as they are.

    Args:
        hparams: The checkpoint's ``hyper_parameters``.
        source: What to call the checkpoint in error messages (``checkpoint runs/best.ckpt``).

    Returns:
        A new dict: the settings with ``captioner`` and without :data:`LEGACY_CAPTIONER_KEYS`.

    Raises:
        RobucapError: The settings name no captioner (neither ``captioner`` nor ``arch``), an architecture robucap
            never had, or options of another architecture.
    """
    model = dict(hparams)
    if "captioner" in model:
        return model
    if "arch" not in model:
        raise RobucapError(
            f"{source} records no captioner (neither model.captioner nor the older model.arch among its "
            "hyper_parameters); expected a .ckpt file written by robucap fit"
        )
    legacy = {key: model.pop(key) for key in LEGACY_CAPTIONER_KEYS if key in model}
    arch = legacy.pop("arch")
    if arch not in ARCHITECTURES:
        raise RobucapError(f"{source} records model.arch {arch!r}; expected one of {list(ARCHITECTURES)}")
    settings_class = registered_captioners()[arch]
    fields = {item.name for item in dataclasses.fields(settings_class)}
    # The old module refused another architecture's options, so anything but None there is not a robucap checkpoint.
    foreign = sorted(key for key, value in legacy.items() if key not in fields and value is not None)
    if foreign:
        raise RobucapError(f"{source} records model.{' / model.'.join(foreign)}, which {arch} does not take")
    init_args = {key: value for key, value in legacy.items() if key in fields}
    model["captioner"] = resolve_captioner_settings({"class_path": arch, "init_args": init_args}).to_dict()
    return model


def same_tokenizer(a: PreTrainedTokenizerFast, b: PreTrainedTokenizerFast) -> bool:
    """Whether two tokenizers map every text to the same ids (same vocabulary, rules and special tokens)."""
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and a.special_tokens_map == b.special_tokens_map
