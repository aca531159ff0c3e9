"""Log sample validation images with their reference and generated captions every validation epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class CaptionSamples(L.Callback):
    """A W&B table (image, references, generated caption) per validation epoch; a JSONL + PNG grid elsewhere.

    Reads ``pl_module.val_samples`` (filled by :class:`~modules.captioning.CaptioningModule` during validation).

    Args:
        max_samples: Rows per epoch.
        key: W&B table key.
    """

    def __init__(self, max_samples: int = 8, key: str = "val/samples") -> None:
        super().__init__()
        self.max_samples = max_samples
        self.key = key

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        samples: list[dict[str, Any]] = list(getattr(pl_module, "val_samples", []))[: self.max_samples]
        if not samples:
            return
        epoch = trainer.current_epoch
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [
                    [
                        s["image_id"],
                        wandb.Image(s["image"].permute(1, 2, 0).numpy()),
                        " | ".join(s["references"]),
                        s["prediction"],
                    ]
                    for s in samples
                ]
                logger.log_table(key=self.key, columns=["image_id", "image", "references", "generated"], data=rows)
            elif logger.log_dir:
                self._write_files(Path(logger.log_dir) / "samples", epoch, samples)

    @staticmethod
    def _write_files(directory: Path, epoch: int, samples: list[dict[str, Any]]) -> None:
        from callbacks.image_grid import save_caption_grid

        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"epoch_{epoch:03d}.jsonl", "w", encoding="utf-8") as fh:
            for s in samples:
                row = {"image_id": s["image_id"], "references": s["references"], "generated": s["prediction"]}
                fh.write(json.dumps(row) + "\n")
        save_caption_grid(
            [s["image"] for s in samples], [s["prediction"] for s in samples], directory / f"epoch_{epoch:03d}.png"
        )
