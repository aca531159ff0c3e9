"""``robucap fit|validate|test|predict``: LightningCLI over CaptioningModule and CaptionDataModule."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.tokenizer import load_tokenizer
from lightning_app.quiet import quiet_evaluation, quiet_third_party
from modules.captioners import resolve_captioner_settings
from modules.captioning import CaptioningModule
from modules.checkpoint import ARCHITECTURE_KEYS, CheckpointInfo, read_checkpoint_info, same_tokenizer
from modules.detection import region_detector  # noqa: F401 - registers poison.detector.checkpoint

# Shipped next to the package (editable install): defaults for loggers and callbacks, overridable from YAML/flags.
DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "defaults.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Lightning resolves these ckpt_path values itself (from the checkpoint callbacks' state), not as file names.
_SPECIAL_CKPT_PATHS = frozenset({"last", "best", "hpc", "registry"})


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` next to the logs and logs the resolved config to every logger (W&B's run config)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        flat = json.loads(config)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": flat})


class RobucapCLI(LightningCLI):
    """LightningCLI with robucap's defaults: W&B (offline without a key) + CSV logging, sample tables,
    best-BLEU checkpoints, and ``model.image_size`` following ``data.image_size``.

    Starting from ``--ckpt_path`` the checkpoint decides the captioner: its tokenizer, architecture and image size
    are used, options that contradict them are refused, and its training settings apply unless given explicitly.
    """

    checkpoint_info: CheckpointInfo | None = None

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # The options typed on the command line: a data config's image size yields to the checkpoint's, a typed one
        # that contradicts it is a mistake.
        self.command_line = list(sys.argv[1:] if args is None else args)
        super().__init__(
            CaptioningModule,
            CaptionDataModule,
            save_config_callback=LoggedConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                command: {"default_config_files": [str(DEFAULTS_FILE)] if DEFAULTS_FILE.is_file() else []}
                for command in SUBCOMMANDS
            },
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing, with a short name written as a config file's ``class_path`` made a one-line error.

        jsonargparse imports every ``class_path`` while it merges config files and raises a bare ``ValueError`` for
        one that is not a dotted path (``class_path: show_attend_tell``), before any of our code sees the value.
        """
        try:
            super().parse_arguments(parser, args)
        except ValueError as err:
            prefix = "Expected a dot import path string: "
            if not str(err).startswith(prefix):
                raise
            name = str(err)[len(prefix) :]
            raise RobucapError(
                f"class_path {name!r} is not a dotted import path; write a captioner by its short name alone "
                f"(captioner: {name}) or by its settings class (class_path: modules.captioners.<file>.<Settings>)"
            ) from err

    # -- the checkpoint decides the model ------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's version, which lets the checkpoint silently override explicit options and turns a
        missing or corrupt file into a traceback."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT_PATHS:
            return
        info = read_checkpoint_info(ckpt_path)
        config = self.config[subcommand]
        defaults = self._subcommand_parsers[subcommand].get_defaults()
        typed = {arg.split("=", 1)[0].lstrip("-") for arg in self.command_line if arg.startswith("--")}
        config_size = config.data.image_size
        apply_checkpoint_settings(config, defaults, info, typed_image_size="data.image_size" in typed)
        if config.data.image_size != config_size:
            print(f"robucap: data.image_size follows the checkpoint: {config.data.image_size} px (the config said "
                  f"{config_size})", file=sys.stderr)  # fmt: skip
        self.checkpoint_info = info

    def before_instantiate_classes(self) -> None:
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        place_logs_under_root(config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        info = self.checkpoint_info
        if info is None:
            return
        tokenizer_dir = self.datamodule.tokenizer_dir
        if tokenizer_dir and not same_tokenizer(load_tokenizer(tokenizer_dir), info.tokenizer):
            raise RobucapError(
                f"data.tokenizer {tokenizer_dir} differs from the tokenizer inside checkpoint {info.path}; the "
                "checkpoint's weights only work with its own tokenizer: drop data.tokenizer"
            )
        self.model.tokenizer = info.tokenizer
        self.datamodule.use_tokenizer(info.tokenizer, f"checkpoint {info.path}")

    def before_validate(self) -> None:
        quiet_evaluation()

    def before_test(self) -> None:
        quiet_evaluation()

    def before_predict(self) -> None:
        quiet_evaluation()


def apply_checkpoint_settings(
    config: Namespace, defaults: Namespace, info: CheckpointInfo, typed_image_size: bool = False
) -> None:
    """Make a subcommand's config build the checkpoint's captioner.

    Architecture settings must match the checkpoint: an explicit different value (command line or config file) is an
    error, an unset one takes the checkpoint's. The image size always follows the checkpoint, except that a
    different ``--data.image_size`` typed on the command line is an error (a data config such as
    ``configs/data/flickr8k.yaml`` sets a size for training new models, not for this one). Other model settings
    (learning rate, beams, caption length...) take the checkpoint's value unless the command line or a config file
    set them.

    Args:
        config: The parsed config of one subcommand (changed in place).
        defaults: The same subcommand's defaults, to tell explicit values from unset ones.
        info: The checkpoint.
        typed_image_size: ``--data.image_size`` was given on the command line.

    Raises:
        RobucapError: An option contradicts the checkpoint.
    """
    conflicts: list[str] = []
    saved_size = info.model.get("image_size")
    if saved_size is not None and config.data.image_size != saved_size:
        if typed_image_size:
            conflicts.append(
                f"data.image_size is {config.data.image_size} but the captioner was trained at {saved_size} px "
                f"(leave data.image_size unset or set it to {saved_size})"
            )
        config.data.image_size = saved_size
    if saved_size is not None:
        config.model.image_size = saved_size
    for key, saved in info.model.items():
        if key == "image_size" or key not in config.model:
            continue  # image_size follows data.image_size; unknown keys come from other robucap versions
        current = config.model[key]
        explicit = _plain(current) != _plain(defaults.model.get(key))
        if key in ARCHITECTURE_KEYS:
            if explicit and _architecture(key, current) != _architecture(key, saved):
                conflicts.append(
                    f"model.{key} is {_architecture(key, current)} but the checkpoint's captioner has "
                    f"{_architecture(key, saved)}"
                )
            config.model[key] = saved
        elif not explicit:
            config.model[key] = saved
    if conflicts:
        raise RobucapError(
            f"options contradict checkpoint {info.path}: {'; '.join(conflicts)}; the checkpoint decides the "
            "captioner's architecture, so drop those options"
        )


def place_logs_under_root(config: Namespace) -> None:
    """Loggers without an explicit ``save_dir`` write under ``trainer.default_root_dir`` (and so do checkpoints,
    which ``ModelCheckpoint`` places in the first logger's directory)."""
    loggers = config.trainer.get("logger")
    if not isinstance(loggers, list):
        loggers = [loggers] if isinstance(loggers, Namespace) else []
    root = config.trainer.get("default_root_dir") or "runs"
    for logger in loggers:
        init_args = logger.get("init_args")
        if isinstance(init_args, Namespace) and "save_dir" in init_args and init_args.save_dir is None:
            init_args.save_dir = str(root)


def _architecture(key: str, value: Any) -> Any:
    """An architecture setting in one comparable form: the captioner as its full ``{class_path, init_args}`` dict
    (a short name or omitted defaults mean the same captioner as the checkpoint's full form)."""
    if key == "captioner":
        return _plain(resolve_captioner_settings(_plain(value)).to_dict())
    return _plain(value)


def _plain(value: Any) -> Any:
    """Compare parsed values by content (tuples vs lists, Namespaces vs dicts)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def run_lightning_cli(args: list[str] | None) -> LightningCLI:
    """Run one LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``): over a captioner, or over a
    detector or segmenter when the config or checkpoint names one (``lightning_app.dense_cli.dense_victim``).

    Args:
        args: Arguments starting with the subcommand; ``None`` reads ``sys.argv``.
    """
    from lightning_app.dense_cli import DenseCLI, dense_victim

    quiet_third_party()
    victim = dense_victim(list(sys.argv[1:] if args is None else args))
    cli = RobucapCLI(args=args) if victim is None else DenseCLI(victim, args=args)
    finish_wandb(cli.trainer)
    report_outputs(cli)
    return cli


def report_outputs(cli: LightningCLI) -> None:
    """Say where a ``fit`` left its checkpoints (the rest of the run's output is Lightning's own)."""
    trainer = cli.trainer
    if cli.subcommand != "fit" or not trainer.is_global_zero:
        return
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.best_model_path:
                print(f"robucap: best checkpoint {callback.best_model_path}")
            if callback.last_model_path:
                print(f"robucap: last checkpoint {callback.last_model_path}")


def finish_wandb(trainer: L.Trainer) -> None:
    """Close W&B runs so the offline transaction log holds every metric (and `wandb sync` sees a finished run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
