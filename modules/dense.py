"""What the dense victims (a detector and a segmenter) share: optimiser, checkpoint marker, local weights, data check.

A dense victim's checkpoint records which victim it holds under :data:`VICTIM_KEY` (``{"victim": "detector",
"class_path": "modules.detection.DetectionModule"}``), so ``robucap validate --ckpt_path`` and the attacks can tell a
detector from a segmenter or a captioner without building a model (:func:`read_victim`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from datamodules.errors import RobucapError
from modules.marked_module import VICTIM_KEY, MarkedModule
from modules.schedules import SCHEDULES

__all__ = ["VICTIM_KEY", "DenseVictimModule", "VictimInfo", "load_local_weights", "read_victim"]


@dataclass(frozen=True)
class VictimInfo:
    """What a dense victim's checkpoint says it holds.

    Attributes:
        victim: ``detector`` or ``segmenter``.
        class_path: The LightningModule class that wrote it.
    """

    victim: str
    class_path: str


def read_victim(path: str | Path) -> VictimInfo | None:
    """The dense victim a checkpoint holds, ``None`` for any other checkpoint (a captioner's) or a non-file.

    Tensors are memory-mapped, not loaded, and no pickled code runs.

    Raises:
        RobucapError: The file exists but is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):
        raise RobucapError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint archive (truncated or corrupt)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RobucapError(f"cannot read checkpoint {path} ({reason})") from err
    marker = checkpoint.get(VICTIM_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(marker, Mapping):
        return None
    return VictimInfo(str(marker["victim"]), str(marker["class_path"]))


def load_local_weights(
    model: nn.Module, path: str, option: str, skip_mismatched: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> None:
    """Load a local state-dict file (torchvision's ``.pth`` files) into ``model``; never downloads.

    Args:
        model: The network.
        path: The file (a plain state dict, or a Lightning checkpoint's ``state_dict`` under ``model.``).
        option: The option that named it, for messages (``model.init_args.weights``).
        skip_mismatched: Prefixes of parameters that keep their fresh initialisation when the file's shape differs
            (the class-specific head of weights trained on another number of classes).
        ignore: Prefixes of parameters in the file that this network does not build (an auxiliary head).

    Raises:
        RobucapError: The file is missing or unreadable, or its parameters do not fit the network.
    """
    file = Path(path)
    if not file.is_file():
        raise RobucapError(f"{option}: weights file {file} does not exist; expected a local torchvision state dict")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise RobucapError(f"{option}: cannot read weights file {file} ({str(err).splitlines()[0]})") from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, Mapping):
        raise RobucapError(f"{option}: weights file {file} does not hold a state dict")
    own = model.state_dict()
    kept = {
        key: value
        for key, value in state.items()
        if not (key in own and own[key].shape != value.shape and key.startswith(skip_mismatched))
        and not (ignore and key.startswith(ignore))
    }
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [key for key in missing if not (key.startswith(skip_mismatched) and key in state)]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise RobucapError(
            f"{option}: weights file {file} does not fit this network ({len(missing)} missing, {len(unexpected)} "
            f"unexpected parameters, e.g. {first!r}); was it written for this architecture?"
        )


class DenseVictimModule(MarkedModule):
    """Base of the dense victims: AdamW with warm-up and a schedule, a checkpoint marker, a data check.

    Subclasses set :attr:`victim` and call ``save_hyperparameters()`` with ``lr``, ``weight_decay``,
    ``warmup_steps``, ``schedule``, ``min_lr_ratio`` and ``num_classes`` among their arguments.
    """

    victim: ClassVar[str] = ""

    @staticmethod
    def check_settings(lr: float, schedule: str, min_lr_ratio: float, warmup_steps: int, num_classes: int) -> None:
        """Refuse out-of-range optimiser settings.

        Raises:
            RobucapError: Naming the option.
        """
        if lr <= 0:
            raise RobucapError(f"model.lr must be > 0, got {lr}")
        if schedule not in SCHEDULES:
            raise RobucapError(f"model.schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise RobucapError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            raise RobucapError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if num_classes < 2:
            raise RobucapError(f"model.num_classes must be >= 2 (the categories plus background), got {num_classes}")

    def setup(self, stage: str) -> None:
        """Check that the data's categories fit the network's classes.

        Raises:
            RobucapError: The data has another number of categories than ``num_classes - 1``.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        categories = getattr(datamodule, "categories", None)
        if categories is None:
            return
        if len(categories) + 1 != self.hparams.num_classes:
            raise RobucapError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {len(categories)} categories "
                f"({', '.join(categories[:8])}{', ...' if len(categories) > 8 else ''}); set model.num_classes to "
                f"{len(categories) + 1} (the categories plus background)"
            )

    def marker_kind(self) -> str:
        """The victim written into the checkpoint."""
        return self.victim

    def marker_expected(self) -> str:
        """``a detector`` / ``a segmenter``."""
        return f"a {self.victim}"

    def marker_missing(self) -> str:
        """A checkpoint without the marker."""
        return "no dense victim (a captioner?)"
