"""Inputs shared by the commands that work on a trained checkpoint and a dataset (``poison-scan``, ``attack``).

Every check raises :class:`~datamodules.errors.RobucapError` with a message naming the file at fault, so the CLI
prints one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from datamodules.errors import RobucapError
from datamodules.formats.detect import detect_format

__all__ = ["checkpoint_path", "data_options", "shapes_root_for"]


def data_options(config: Path | None, data_root: str | None) -> dict[str, Any]:
    """The :class:`~datamodules.datamodule.CaptionDataModule` options of a command.

    Args:
        config: A YAML file with a ``data:`` section (the data module's options, as for ``robucap fit``), or
            ``None`` to use ``data_root`` as a shapes dataset directory.
        data_root: Overrides ``data.root`` of the config; without a config, a dataset directory whose format is
            detected from its files (:func:`datamodules.formats.detect.detect_format`).

    Returns:
        The options, with ``tokenizer: None`` (the checkpoint's tokenizer is used instead).

    Raises:
        RobucapError: Neither input is given, the config is missing, not YAML or has no ``data:`` section, or (without
            a config) the data directory does not exist or its layout is unknown or ambiguous.
    """
    if config is None:
        if not data_root:
            raise RobucapError(
                "no data: give --config (a YAML file with a data: section) or --data-root (a dataset directory)"
            )
        # The layout its files show (Flickr8k, Karpathy, COCO, shapes, a captioned folder); one error otherwise.
        return {"format": detect_format(data_root), "root": str(data_root), "tokenizer": None}
    if not config.is_file():
        raise RobucapError(f"config file {config} does not exist (expected a YAML file with a data: section)")
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RobucapError(f"config file {config} is not valid YAML: {error}") from error
    data = loaded.get("data") if isinstance(loaded, dict) else None
    if not isinstance(data, dict):
        raise RobucapError(f"config file {config} has no data: section (the data module's options)")
    if data_root:
        data = {**data, "root": data_root}
    return {**data, "tokenizer": None}


def checkpoint_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing checkpoint file.

    Raises:
        RobucapError: There is no file at ``path``.
    """
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise RobucapError(f"checkpoint {checkpoint} does not exist")
    return checkpoint


def shapes_root_for(smoke: bool = False, seed: int = 0, image_size: int = 64) -> str:
    """``data/shapes`` for the default shapes data, else a folder named after the settings that differ.

    The shapes generator refuses to rewrite a dataset made with other settings, so a command whose profile, seed or
    image size asks for other shapes data defaults to its own folder (``data/shapes_smoke_seed2_32px``) instead of
    an error about the shared one.
    """
    parts = (
        (["smoke"] if smoke else [])
        + ([f"seed{seed}"] if seed else [])
        + ([f"{image_size}px"] if image_size != 64 else [])
    )
    return "data/shapes" + "".join(f"_{part}" for part in parts)
