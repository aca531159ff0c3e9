"""``robucap fit|validate|test|predict``: LightningCLI over CaptioningModule and CaptionDataModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datamodules.datamodule import CaptionDataModule
from modules.captioning import CaptioningModule

# Shipped next to the package (editable install): defaults for loggers and callbacks, overridable from YAML/flags.
DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "defaults.yaml"


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` next to the logs and logs the resolved config to every logger (W&B's run config)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        import json

        flat = json.loads(config)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": flat})


class RobucapCLI(LightningCLI):
    """LightningCLI with robucap's defaults: W&B (offline without a key) + CSV logging, sample tables,
    best-BLEU checkpoints, and ``model.image_size`` following ``data.image_size``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            CaptioningModule,
            CaptionDataModule,
            save_config_callback=LoggedConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                command: {"default_config_files": [str(DEFAULTS_FILE)] if DEFAULTS_FILE.is_file() else []}
                for command in ("fit", "validate", "test", "predict")
            },
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")


def run_lightning_cli(args: list[str] | None) -> RobucapCLI:
    """Run one LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Arguments starting with the subcommand; ``None`` reads ``sys.argv``.
    """
    cli = RobucapCLI(args=args)
    finish_wandb(cli.trainer)
    return cli


def finish_wandb(trainer: L.Trainer) -> None:
    """Close W&B runs so the offline transaction log holds every metric (and `wandb sync` sees a finished run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
