"""AdversarialExamples: a PNG grid (original / adversarial / difference) for CSV runs and runs without a logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from callbacks import AdversarialExamples
from callbacks.image_grid import difference_gain, difference_image, gain_label
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


def _row(clean: torch.Tensor, adversarial: torch.Tensor) -> dict:
    linf = float((adversarial - clean).abs().max())
    return {"clean": clean, "adversarial": adversarial, "linf": linf, "clean_caption": "a", "adversarial_caption": "b"}


def test_grid_draws_the_difference_with_the_shared_gain_rule() -> None:
    """The callback's difference panel is every figure's drawing: 0.5 / ε for an L-infinity budget, one gain for the
    whole grid (a small change stays small next to a large one), and the largest change for FG's L2 budget."""
    clean = torch.full((3, 4, 4), 0.5)
    small, large = clean.clone(), clean.clone()
    small[0, 0, 0] += 0.01
    large[1, 0, 0] -= 0.04
    callback = AdversarialExamples(epsilon=0.05)
    callback.rows = [_row(clean, small), _row(clean, large)]
    images, captions = callback.grid()
    gain = difference_gain([small - clean], 0.05)
    assert gain == pytest.approx(10.0) and torch.equal(images[2], difference_image(clean, small, gain))
    assert images[2][0, 0, 0] == pytest.approx(0.6) and images[5][1, 0, 0] == pytest.approx(0.1)
    assert torch.all(images[2][1:] == 0.5)  # unchanged pixels stay grey
    assert captions[2].startswith(gain_label(gain))
    fg = AdversarialExamples(attack="fg", epsilon=0.5)
    fg.rows = callback.rows
    images, captions = fg.grid()
    assert images[5][1, 0, 0] == pytest.approx(0.0) and images[2][0, 0, 0] == pytest.approx(0.5 + 0.5 * 0.01 / 0.04)
    assert captions[5].startswith(gain_label(0.5 / 0.04))
