"""The one captioning loop (modules/captions.py) and the captioned-image record (modules/records.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from modules.attacks import build_attack
from modules.captioning import CaptioningModule
from modules.captions import caption_batches, caption_images
from modules.evaluation import bleu_of, evaluation_loader
from modules.records import CaptionedImage, records_to_json


def _module(checkpoint: Path) -> CaptioningModule:
    return CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)


def test_caption_images_batches_and_restores_modes(distinct_checkpoint: Path, shapes_root: Path) -> None:
    module = _module(distinct_checkpoint).train()
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, progress=False)
    dm.tokenizer = module.tokenizer
    batch = next(iter(evaluation_loader(module, dm.eval_dataset("test"), 5, 5)))
    images = batch["pixel_values"]
    # Captioned in eval mode (dropout off), so the batch size cannot change a caption; the modes come back.
    by_two = caption_images(module, images, batch_size=2)
    assert module.training and all(m.training for m in module.modules())
    module.eval()
    assert by_two == caption_images(module, images, batch_size=5) == module.caption(images)
    assert len(set(by_two)) > 2
    short = caption_images(module, images, batch_size=5, max_new_tokens=3)
    assert all(len(s.split()) <= 3 for s in short) and short != by_two

    records = caption_batches(module, evaluation_loader(module, dm.eval_dataset("test"), 5, 2))
    assert [r.prediction for r in records] == by_two
    assert [r.image_id for r in records] == list(batch["image_id"])
    assert bleu_of(records)["bleu4"] >= 0.0
    attacked = caption_batches(
        module, evaluation_loader(module, dm.eval_dataset("test"), 5, 2), build_attack("pgd", 0.1)
    )
    assert [r.image_id for r in attacked] == [r.image_id for r in records]
    assert [r.prediction for r in attacked] != by_two  # PGD at 0.1 changes some caption
    with pytest.raises(RobucapError, match="batch_size must be >= 1"):
        caption_images(module, images, batch_size=0)


def test_record_json_leaves_out_what_was_not_filled() -> None:
    plain = CaptionedImage(image_id=3, prediction="a red circle", references=["a red circle", "a circle"])
    assert plain.to_json() == {"image_id": 3, "prediction": "a red circle", "references": ["a red circle", "a circle"]}
    attacked = CaptionedImage(
        image_id="x", prediction="a cross", references=["a dot"], clean="a dot", target=["cross"], success=True,
        changed=True, l2=0.5, poisoned=True,
    )  # fmt: skip
    assert records_to_json([attacked]) == [
        {"image_id": "x", "prediction": "a cross", "references": ["a dot"], "clean": "a dot", "target": ["cross"],
         "success": True, "changed": True, "l2": 0.5, "poisoned": True}
    ]  # fmt: skip
