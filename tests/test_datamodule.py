"""CaptionDataModule over every format: pairs for training, unique images with all references for evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.fake_datasets import tree_digest, write_coco, write_flickr8k, write_folder, write_karpathy

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import DataError, RobucapError

WRITERS = {
    "coco": lambda root: write_coco(root, n_images=4),
    "karpathy": lambda root: write_karpathy(root, dataset="flickr30k", n_images=4),
    "flickr8k": lambda root: write_flickr8k(root, n_images=4),
    "folder": lambda root: write_folder(root, n_images=4),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_batches(fmt: str, tmp_path: Path) -> None:
    fake = WRITERS[fmt](tmp_path / fmt)
    before = tree_digest(fake.root)
    dm = CaptionDataModule(format=fmt, root=str(fake.root), image_size=32, batch_size=3, progress=False)
    dm.setup("fit")
    dm.setup("test")

    train_ids = fake.splits["train"]
    assert len(dm.datasets["train"]) == sum(len(c) for c in train_ids.values())  # (image, caption) pairs
    assert len(dm.datasets["val"]) == len(fake.splits["val"])  # unique images

    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["labels"] == -100).eq(batch["attention_mask"] == 0).all()

    seen: dict[object, list[str]] = {}
    for val_batch in dm.val_dataloader():
        for image_id, refs in zip(val_batch["image_id"], val_batch["references"], strict=True):
            seen[image_id] = refs
    assert seen == {k: list(v) for k, v in fake.splits["val"].items()}
    assert tree_digest(fake.root) == before  # nothing under the source dataset is written


def test_shapes_generated_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    dm = CaptionDataModule(
        format="shapes", root=str(root), image_size=32, progress=False,
        shapes={"n_train": 5, "n_val": 3, "n_test": 2},
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.describe()["splits"] == {"train": 5, "val": 3}
    assert len(dm.datasets["train"]) == 25  # five captions per image


def test_limits_and_cache_equivalence(shapes_root: Path) -> None:
    cached = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, limit_val=5, cache_images=True)
    lazy = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, limit_val=5, cache_images=False)
    for dm in (cached, lazy):
        dm.progress = False
        dm.setup("validate")
    assert len(cached.datasets["val"]) == 5
    for i in range(5):
        assert torch.equal(cached.datasets["val"][i]["pixel_values"], lazy.datasets["val"][i]["pixel_values"])


def test_tokenizer_directory_is_used(shapes_root: Path, tmp_path: Path) -> None:
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, progress=False)
    dm.setup("validate")
    dm.tokenizer.save_pretrained(tmp_path / "tok")
    again = CaptionDataModule(format="coco", root=str(shapes_root), tokenizer=str(tmp_path / "tok"), progress=False)
    again.setup("validate")
    assert again.tokenizer.get_vocab() == dm.tokenizer.get_vocab()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 4}, "data.image_size must be between 8 and 4096"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"max_tokens": 1}, "data.max_tokens must be >= 2"),
        ({"limit_val": 0}, "data.limit_val must be >= 1"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        CaptionDataModule(**kwargs)


def test_unknown_format_and_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset format 'tfrecord'"):
        CaptionDataModule(format="tfrecord", root=str(tmp_path)).setup("fit")
    with pytest.raises(DataError, match="tokenizer directory .*missing_tok does not exist"):
        CaptionDataModule(format="coco", root=str(tmp_path), tokenizer=str(tmp_path / "missing_tok")).setup("fit")
