"""AdversarialExamples: a PNG grid (original / adversarial / difference) for CSV runs and runs without a logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks import AdversarialExamples
from callbacks.adversarial_examples import amplified_difference
from datamodules.datamodule import CaptionDataModule
from modules.captioning import CaptioningModule


@pytest.mark.parametrize("with_csv_logger", [True, False])
def test_png_grid_is_written(
    shapes_root: Path, trained_checkpoint: Path, tmp_path: Path, with_csv_logger: bool
) -> None:
    module = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True)
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=8, eval_batch_size=2,
                           progress=False)  # fmt: skip
    logger = CSVLogger(str(tmp_path / "logs")) if with_csv_logger else False
    callback = AdversarialExamples(num_images=3, epsilon=0.1)
    trainer = L.Trainer(logger=logger, default_root_dir=str(tmp_path), limit_val_batches=2, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.validate(module, datamodule=dm, verbose=False)

    base = Path(trainer.logger.log_dir) if with_csv_logger else tmp_path
    path = base / "adversarial_examples" / "epoch_000.png"
    assert callback.last_path == path and path.is_file()
    assert len(callback.rows) == 3  # gathered across the two batches of 2
    with Image.open(path) as image:
        width, height = image.size
    assert width > 300 and height > 300  # three rows of three panels, each with a caption underneath


def test_amplified_difference() -> None:
    clean = torch.full((2, 3, 4, 4), 0.5)
    adversarial = clean.clone()
    adversarial[0, 0, 0, 0] += 0.02
    adversarial[0, 1, 0, 0] -= 0.01
    signed, absolute = amplified_difference(clean, adversarial), amplified_difference(clean, adversarial, False)
    assert signed[0, 0, 0, 0] == pytest.approx(1.0) and signed[0, 1, 0, 0] == pytest.approx(0.25)
    assert absolute[0, 0, 0, 0] == pytest.approx(1.0) and absolute[0, 1, 0, 0] == pytest.approx(0.5)
    assert torch.all(signed[1] == 0.5) and torch.all(absolute[1] == 0)  # an unchanged image stays neutral
