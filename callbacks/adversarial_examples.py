"""Show what an attack does: original / adversarial / difference, with captions.

The layout of Table 1 in Rashid & Rivas 2024; the difference is drawn with the gain rule of every robucap figure
(:mod:`callbacks.image_grid`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from callbacks.image_grid import caption_grid_png, difference_gain, difference_image, gain_label
from modules.attacks import FG, build_attack, check_epsilon
from modules.victims.captioner import CaptionObjective

__all__ = ["AdversarialExamples"]


class AdversarialExamples(L.Callback):
    """Every validation epoch, a grid of the first validation images of rank 0 under attack.

    One row per image: the original with its generated caption, the adversarial image with its caption, and the
    perturbation ``δ`` around grey (labelled with the gain and its true L-infinity size), as in Rashid & Rivas's (2024)
    Table 1. ``δ`` is drawn signed: FGSM moves almost every pixel by exactly ε, so ``|δ|`` would be a nearly uniform
    image; its sign pattern (the patch-aligned structure Rashid & Rivas 2024 points out for ViT) carries the
    information. The gain is ``0.5 / ε`` for an L-infinity budget, so every epoch's grid shares one scale.
    The attack is white-box against the current weights, untargeted on the first reference caption.

    The grid goes to W&B (``WandbLogger.log_image`` under ``key``) and, for every other logger with a log directory
    (CSV), to ``<log_dir>/adversarial_examples/epoch_NNN.png``; without any logger to
    ``<default_root_dir>/adversarial_examples/epoch_NNN.png``. :attr:`last_path` holds the last file written.

    Args:
        num_images: Rows of the grid.
        attack: Attack name from :mod:`modules.attacks`.
        epsilon: Budget in [0, 1] pixel units.
        attack_kwargs: Options of the attack.
        key: W&B image key.
    """

    def __init__(
        self,
        num_images: int = 4,
        attack: str = "fgsm",
        epsilon: float = 0.05,
        attack_kwargs: dict[str, Any] | None = None,
        key: str = "val/adversarial_examples",
    ) -> None:
        super().__init__()
        self.num_images = max(1, int(num_images))
        self.epsilon = check_epsilon(epsilon, "AdversarialExamples epsilon")
        self.attack_name = attack
        self.attack = build_attack(attack, self.epsilon, **dict(attack_kwargs or {}))
        self.key = key
        self.rows: list[dict[str, Any]] = []
        self.last_path: Path | None = None

    def grid(self) -> tuple[list[torch.Tensor], list[str]]:
        """The grid's panels (original, adversarial, difference per row) and their captions.

        Shape:
            Every panel: ``(3, H, W)`` in [0, 1].
        """
        # An L-infinity budget sets the scale; FG's budget is L2, no pixel bound, so its largest change does.
        budget = None if isinstance(self.attack, FG) else self.epsilon
        gain = difference_gain([row["adversarial"] - row["clean"] for row in self.rows], budget)
        images: list[torch.Tensor] = []
        captions: list[str] = []
        for row in self.rows:
            images += [row["clean"], row["adversarial"], difference_image(row["clean"], row["adversarial"], gain)]
            captions += [
                f"original: {row['clean_caption']}",
                f"{self.attack_name} ε={self.epsilon:g}: {row['adversarial_caption']}",
                f"{gain_label(gain)} (max |δ| {row['linf']:.3f} = {row['linf'] * 255:.1f}/255)",
            ]
        return images, captions

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Rank 0 only: attack and generation involve no collective, so the other ranks need not wait.
        if trainer.sanity_checking or not trainer.is_global_zero or len(self.rows) >= self.num_images:
            return
        take = self.num_images - len(self.rows)
        images = batch["pixel_values"][:take]
        adversarial = self.attack(CaptionObjective(pl_module.captioner, batch["labels"][:take]), images).adversarial
        clean_captions = pl_module.caption(images)
        adversarial_captions = pl_module.caption(adversarial)
        for i in range(images.shape[0]):
            self.rows.append(
                {
                    "clean": images[i].detach().float().cpu(),
                    "adversarial": adversarial[i].detach().float().cpu(),
                    "linf": float((adversarial[i].float() - images[i].float()).abs().max()),
                    "clean_caption": clean_captions[i],
                    "adversarial_caption": adversarial_captions[i],
                }
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.rows:
            return
        images, captions = self.grid()
        png = caption_grid_png(images, captions, columns=3)
        name = f"epoch_{trainer.current_epoch:03d}.png"
        directories: list[Path] = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                from PIL import Image

                logger.log_image(
                    key=self.key, images=[Image.open(io.BytesIO(png))], caption=[f"epoch {trainer.current_epoch}"]
                )
            elif logger.log_dir:
                directories.append(Path(logger.log_dir))
        if not trainer.loggers:
            directories.append(Path(trainer.default_root_dir))
        for directory in directories:
            path = directory / "adversarial_examples" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            self.last_path = path
