"""The inputs of an attack command: the device, the checkpoint and the first images of a dataset split.

Data settings come from ``--data_config`` when given, else from the checkpoint's own data module (its format for its
own root, the detected format for another ``--data_root``); ``--format`` overrides either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import DataError, RobucapError
from datamodules.formats import FORMATS
from datamodules.formats.detect import detect_format
from lightning_app.attack.settings import AttackSettings
from lightning_app.inputs import checkpoint_path, data_options
from modules.captioning import CaptioningModule
from modules.checkpoint import read_checkpoint_info
from modules.evaluation import evaluation_loader

__all__ = ["EvalImages", "check_common", "load_eval_images", "load_module", "resolve_device", "saved_data_settings"]


def resolve_device(name: str) -> torch.device:
    """The torch device that ``--device`` names (``auto``: CUDA when available).

    Raises:
        RobucapError: A CUDA device without CUDA, or a name torch does not know.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RobucapError(f"--device {name}: no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise RobucapError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from error


def load_module(path: str, device: torch.device) -> CaptioningModule:
    """A checkpoint's captioning module on ``device``, in eval mode.

    Raises:
        RobucapError: No file, or a file that is not a robucap checkpoint.
    """
    checkpoint = checkpoint_path(path)
    # A missing, truncated, corrupt or foreign file is bad input, named in one line here; once the file is known to
    # be a robucap checkpoint, an exception while building the model from it is a bug and keeps its traceback.
    read_checkpoint_info(checkpoint)
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    # Eval mode: dropout would make clean captions, targets and success checks random.
    return module.to(device).eval()


def check_common(settings: AttackSettings) -> None:
    """Range checks of the settings every subcommand shares.

    Raises:
        RobucapError: ``images`` or ``batch_size`` below 1, ``examples`` below 0, or an unknown ``format``.
    """
    if settings.images < 1:
        raise RobucapError(f"--images must be >= 1, got {settings.images}")
    if settings.batch_size < 1:
        raise RobucapError(f"--batch_size must be >= 1, got {settings.batch_size}")
    if settings.examples < 0:
        raise RobucapError(f"--examples must be >= 0, got {settings.examples}")
    if settings.format is not None and settings.format not in FORMATS:
        raise RobucapError(f"--format {settings.format!r} is not a dataset format; expected one of {sorted(FORMATS)}")


@dataclass
class EvalImages:
    """The first ``--images`` images of the split, as loaded batches.

    Attributes:
        batches: Collated batches (``pixel_values``, ``labels`` for the first reference, ``image_id``, ``references``).
        description: What was loaded, for ``results.json``.
    """

    batches: list[dict[str, Any]]
    description: dict[str, Any]

    @property
    def images(self) -> torch.Tensor:
        """All images. Shape: ``(N, 3, H, W)`` in [0, 1]."""
        return torch.cat([b["pixel_values"] for b in self.batches])

    @property
    def image_ids(self) -> list[Any]:
        """One id per image."""
        return [i for b in self.batches for i in b["image_id"]]

    @property
    def references(self) -> list[list[str]]:
        """The reference captions of every image."""
        return [list(r) for b in self.batches for r in b["references"]]


# Data settings a checkpoint's own data module carries over to an attack; the rest (batching, poisoning, the
# training tokenizer, split limits) concern training only.
_CARRIED_DATA_SETTINGS: tuple[str, ...] = ("format", "root", "format_options", "max_tokens")
# Formats that read the same files, so format options saved for one apply to the other.
_COCO_LAYOUTS = frozenset({"coco", "shapes"})


def saved_data_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """The data settings that ``robucap fit`` saved in a checkpoint, or ``None`` for an older or foreign one.

    Lightning stores the data module's ``save_hyperparameters()`` under ``datamodule_hyper_parameters``; only
    :data:`_CARRIED_DATA_SETTINGS` are returned, and only when a format and a root are recorded.

    Raises:
        RobucapError: The file cannot be read as a checkpoint.
    """
    try:
        # mmap: the weights are not read again, only the small dictionaries around them.
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError) as error:  # torch.load's errors for a truncated or foreign file
        raise RobucapError(f"cannot read checkpoint {checkpoint}: {error}") from error
    hparams = saved.get("datamodule_hyper_parameters") if isinstance(saved, dict) else None
    if not isinstance(hparams, Mapping) or not all(isinstance(hparams.get(k), str) for k in ("format", "root")):
        return None
    return {k: hparams[k] for k in _CARRIED_DATA_SETTINGS if hparams.get(k) is not None}


def _checkpoint_data_options(settings: AttackSettings, checkpoint: str) -> tuple[dict[str, Any], str]:
    """Data options without ``--data_config``: the checkpoint's own settings, ``--data_root`` and ``--format``.

    The checkpoint's format is used for its own root; another root (``--data_root``) is read in the format its files
    show (:func:`~datamodules.formats.detect.detect_format`) unless ``--format`` names one. The saved format options
    apply only to the saved format's layout.

    Returns:
        The options, and where the format came from (``--format``, ``checkpoint`` or ``detected``).

    Raises:
        RobucapError: No data at all, a missing data directory, or a directory of no (or several) known layouts.
    """
    saved = saved_data_settings(checkpoint)
    root = settings.data_root or (saved["root"] if saved else None)
    if root is None:
        raise RobucapError(
            f"no data: give --data_root (a dataset directory) or --data_config (a YAML file with a data: section); "
            f"checkpoint {checkpoint} records no data settings"
        )
    if not Path(root).is_dir():
        if settings.data_root:
            raise RobucapError(f"data directory {root} does not exist (expected a dataset root)")
        raise RobucapError(
            f"data directory {root}, recorded in checkpoint {checkpoint}, does not exist; give --data_root (where "
            "the dataset is now) or --data_config"
        )
    if settings.format is not None:
        fmt, source = settings.format, "--format"
    elif saved is not None and not settings.data_root:
        fmt, source = saved["format"], "checkpoint"
    else:
        try:
            fmt, source = detect_format(root), "detected"
        except DataError as error:
            raise DataError(f"{error}; give --format or --data_config") from error
    options: dict[str, Any] = {"format": fmt, "root": str(root), "tokenizer": None}
    if saved is not None:
        same_layout = fmt == saved["format"] or {fmt, saved["format"]} <= _COCO_LAYOUTS
        options.update({k: v for k, v in saved.items() if k not in ("format", "root", "format_options")})
        if same_layout and "format_options" in saved:
            options["format_options"] = saved["format_options"]
    return options, source


def load_eval_images(settings: AttackSettings, module: CaptioningModule, checkpoint: str) -> EvalImages:
    """Load the images an attack command works on, tokenized with ``module``'s tokenizer.

    Data settings come from ``--data_config`` when given, else from the checkpoint's own data module (its format for its
    own root, the detected format for another ``--data_root``); ``--format`` overrides either. Images are always
    resized to the captioner's input size: a config's ``data.image_size`` is a training choice, and a different
    ``--image_size`` is refused.

    Args:
        settings: ``data_config``, ``data_root``, ``format``, ``image_size``, ``split``, ``images``, ``batch_size``.
        module: Its tokenizer labels the batches; its input size is the images' size.
        checkpoint: The checkpoint ``module`` was loaded from (for its data settings).

    Raises:
        RobucapError: No or bad data options, a missing dataset or split, an unknown layout, an empty split, or an
            ``--image_size`` other than the checkpoint's.
    """
    model_size = int(module.hparams.image_size)
    if settings.image_size is not None and settings.image_size != model_size:
        raise RobucapError(
            f"--image_size is {settings.image_size} px but checkpoint {checkpoint}'s captioner takes {model_size} px "
            "images (leave --image_size out to use the checkpoint's size)"
        )
    config = Path(settings.data_config) if settings.data_config else None
    if config is not None:
        options = data_options(config, settings.data_root)
        source = "config"
        if settings.format is not None and settings.format != options.get("format"):
            # The config's format options describe its own layout, not the one --format names.
            options = {**options, "format": settings.format, "format_options": None}
            source = "--format"
    else:
        options, source = _checkpoint_data_options(settings, checkpoint)
    options["image_size"] = model_size
    options.setdefault("progress", False)
    try:
        datamodule = CaptionDataModule(**options)
    except TypeError as error:
        raise RobucapError(f"data config file {settings.data_config}: bad data: options ({error})") from error
    if config is not None:
        # Only a config may ask for generated data; a bare --data_root is read, never written.
        datamodule.prepare_data()
    datamodule.tokenizer = module.tokenizer
    dataset = datamodule.eval_dataset(settings.split)
    if len(dataset) == 0:
        raise RobucapError(f"the {settings.split} split of {options.get('root')} has no images")
    batches = list(evaluation_loader(module, dataset, settings.images, settings.batch_size))
    description = {
        "format": options.get("format"),
        "format_from": source,
        "root": str(options.get("root")),
        "config": settings.data_config,
        "split": settings.split,
        "image_size": options["image_size"],
        "n_images": sum(len(b["image_id"]) for b in batches),
    }
    return EvalImages(batches, description)
