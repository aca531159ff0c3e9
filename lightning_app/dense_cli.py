"""``robucap fit|validate|test|predict`` for the modules that are not captioners: LightningCLI over a detector or a
segmenter and :class:`~datamodules.instances.InstancesDataModule`, or over a part-pretraining module and its data
(:data:`KINDS`).

The command routes here (:func:`dense_victim`) when a ``--config`` file's ``model.class_path`` (or ``--model``) names
one of :data:`VICTIM_CLASSES`, or, with no model named, when ``--ckpt_path`` holds one; captioner configs keep going
to :class:`~lightning_app.lightning_cli.RobucapCLI` unchanged. Defaults: ``configs/defaults.yaml`` (loggers, root
directory), then ``configs/defaults_<kind>.yaml`` (the model class and the callbacks that apply to it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.errors import RobucapError
from datamodules.instances import InstancesDataModule
from datamodules.pretraining import CaptionTextDataModule, ShapesAttributesDataModule
from lightning_app.lightning_cli import DEFAULTS_FILE, SUBCOMMANDS, LoggedConfigCallback, place_logs_under_root
from lightning_app.quiet import quiet_evaluation
from modules.dense import DenseVictimModule, read_victim
from modules.pretraining import DecoderPretraining, EncoderPretraining

__all__ = ["KINDS", "VICTIM_CLASSES", "DenseCLI", "ModuleKind", "dense_victim", "victim_defaults"]


@dataclass(frozen=True)
class ModuleKind:
    """A kind of LightningModule other than a captioner that ``robucap fit|validate|test|predict`` runs.

    Attributes:
        model: Base class of its modules (a config's ``model.class_path`` names it or a subclass).
        datamodule: The data module it trains on.
        image_size_link: ``data.image_size`` also sets ``model.init_args.image_size``.
    """

    model: type[L.LightningModule]
    datamodule: type[L.LightningDataModule]
    image_size_link: bool = True


# The non-captioner modules: class_path -> kind. A module's checkpoint marker (modules.dense.VICTIM_KEY) names its kind.
VICTIM_CLASSES = {
    "modules.detection.DetectionModule": "detector",
    "modules.segmentation.SegmentationModule": "segmenter",
    "modules.pretraining.encoder.EncoderPretraining": "encoder_pretraining",
    "modules.pretraining.decoder.DecoderPretraining": "decoder_pretraining",
}
KINDS = {
    "detector": ModuleKind(DenseVictimModule, InstancesDataModule),
    "segmenter": ModuleKind(DenseVictimModule, InstancesDataModule),
    "encoder_pretraining": ModuleKind(EncoderPretraining, ShapesAttributesDataModule),
    "decoder_pretraining": ModuleKind(DecoderPretraining, CaptionTextDataModule, image_size_link=False),
}
_CONFIG_FLAGS = ("--config", "-c")


def victim_defaults(victim: str) -> Path:
    """``configs/defaults_<victim>.yaml``, read after ``configs/defaults.yaml``."""
    return DEFAULTS_FILE.with_name(f"defaults_{victim}.yaml")


def dense_victim(argv: list[str]) -> str | None:
    """The dense victim a ``fit|validate|test|predict`` command line is about, ``None`` for a captioner.

    The last config file (or ``--model`` flag) that says something about the model decides: its ``class_path`` names
    a dense victim, or it configures a captioner. With no model named, a ``--ckpt_path`` holding a dense victim
    decides. Unreadable config files and checkpoints decide nothing here (the CLI that runs reports them).

    Args:
        argv: Arguments starting with the subcommand.
    """
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    decided: tuple[str | None] | None = None
    for flag, value in _options(argv[1:]):
        if flag in _CONFIG_FLAGS:
            model = _config_model(value)
            if model is not None:
                decided = (_victim_of(model),)
        elif flag in ("--model", "--model.class_path"):
            decided = (VICTIM_CLASSES.get(value),)
    if decided is not None:
        return decided[0]
    for flag, value in _options(argv[1:]):
        if flag == "--ckpt_path":
            try:
                info = read_victim(value)
            except RobucapError:
                return None  # not a readable checkpoint: the captioners' CLI reports it as it always has
            return info.victim if info is not None else None
    return None


def _options(args: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` pairs of ``--flag value`` and ``--flag=value`` arguments."""
    pairs = []
    for i, arg in enumerate(args):
        if "=" in arg and arg.startswith("-"):
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
        elif arg.startswith("-") and i + 1 < len(args):
            pairs.append((arg, args[i + 1]))
    return pairs


def _config_model(path: str) -> Any:
    """The ``model`` section of a config file, ``None`` when it has none or cannot be read."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("model") if isinstance(data, dict) else None


def _victim_of(model: Any) -> str | None:
    class_path = model.get("class_path") if isinstance(model, dict) else model
    return VICTIM_CLASSES.get(class_path) if isinstance(class_path, str) else None


class DenseCLI(LightningCLI):
    """LightningCLI for a detector, a segmenter or a part-pretraining module (:data:`KINDS`), with robucap's
    loggers, checkpoints and seed.

    Starting from ``--ckpt_path`` the checkpoint decides the model (its class and every setting, image size
    included); a checkpoint of another victim, or a captioner's, is refused in one line.

    Args:
        victim: A key of :data:`KINDS` (``detector``, ``segmenter``, ``encoder_pretraining``, ...).
        args: Arguments starting with the subcommand; ``None`` reads ``sys.argv``.
        run: Run the subcommand.
    """

    def __init__(self, victim: str, args: list[str] | None = None, run: bool = True) -> None:
        self.victim = victim
        defaults = [str(path) for path in (DEFAULTS_FILE, victim_defaults(victim)) if path.is_file()]
        kind = KINDS[victim]
        super().__init__(
            kind.model,
            kind.datamodule,
            subclass_mode_model=True,
            save_config_callback=LoggedConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={command: {"default_config_files": defaults} for command in SUBCOMMANDS},
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if KINDS[self.victim].image_size_link:
            parser.link_arguments("data.image_size", "model.init_args.image_size")

    def _parse_ckpt_path(self) -> None:
        """Build the checkpoint's model: Lightning's version expects hyper-parameters that only a module built by
        LightningCLI records, and gives a missing file a traceback."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
            return
        info = read_victim(ckpt_path)
        if info is None:
            what = "does not exist" if not Path(ckpt_path).exists() else "holds no detector or segmenter (a captioner?)"
            raise RobucapError(
                f"checkpoint {ckpt_path} {what}; expected a {self.victim} checkpoint written by robucap fit"
            )
        if info.victim != self.victim:
            raise RobucapError(f"checkpoint {ckpt_path} holds a {info.victim}, but the config trains a {self.victim}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        model = {"class_path": info.class_path, "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        config = self.config[subcommand]
        size = hparams.get("image_size")
        if size is not None and config.data.image_size != size:
            print(f"robucap: data.image_size follows the checkpoint: {size} px", file=sys.stderr)
            config.data.image_size = size
        if size is not None:
            # parse_object re-applied the link from the data's size; the model takes the checkpoint's, as the data does.
            config.model.init_args.image_size = size

    def before_instantiate_classes(self) -> None:
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        place_logs_under_root(config)

    def before_validate(self) -> None:
        quiet_evaluation()

    def before_test(self) -> None:
        quiet_evaluation()

    def before_predict(self) -> None:
        quiet_evaluation()
