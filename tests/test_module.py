"""CaptioningModule: optimisation setup, schedules, metrics wiring, checkpoints carrying their tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from modules.captioning import CaptioningModule, read_checkpoint_tokenizer
from modules.metrics import CaptionBLEU
from modules.schedules import warmup_cosine


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "model.lr must be > 0"),
        ({"schedule": "step"}, "model.schedule must be one of"),
        ({"min_lr_ratio": 2.0}, "model.min_lr_ratio must be in"),
        ({"num_beams": 0}, "model.num_beams"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        CaptioningModule(**kwargs)


@pytest.fixture()
def datamodule(shapes_root: Path) -> CaptionDataModule:
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=8, progress=False)
    dm.setup("fit")
    return dm


def test_optimizer_skips_frozen_parameters_and_decays_only_matrices(datamodule: CaptionDataModule) -> None:
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)
    for p in module.captioner.encoder.parameters():
        p.requires_grad_(False)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in module.captioner.encoder.parameters())
    assert all(id(p) in in_optimizer for p in module.captioner.decoder.parameters())
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"])


def test_validation_bleu_matches_the_metric_on_the_same_predictions(datamodule: CaptionDataModule) -> None:
    L.seed_everything(0)
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32, max_new_tokens=8)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    reference = CaptionBLEU()
    module.eval()
    for i, batch in enumerate(datamodule.val_dataloader()):
        if i == 2:
            break
        reference.update(module.caption(batch["pixel_values"]), batch["references"], batch["image_id"])
    expected = reference.compute()
    for n in range(1, 5):
        assert metrics[f"val/bleu{n}"] == pytest.approx(float(expected[f"bleu{n}"]), abs=1e-6)
    assert math.isfinite(metrics["val/loss"])


def test_checkpoint_carries_tokenizer(trained_checkpoint: Path) -> None:
    tokenizer = read_checkpoint_tokenizer(trained_checkpoint)
    module = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True)
    assert module.tokenizer.get_vocab() == tokenizer.get_vocab()
    captions = module.eval().caption(torch.rand(2, 3, 32, 32))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RobucapError, match=r"cannot read checkpoint .*broken\.ckpt"):
        read_checkpoint_tokenizer(path)
