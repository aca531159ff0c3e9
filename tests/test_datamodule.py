"""CaptionDataModule over every format: pairs for training, unique images with all references for evaluation."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.fake_datasets import tree_digest, write_coco, write_flickr8k, write_folder, write_image, write_karpathy

from datamodules.datamodule import CaptionDataModule
from datamodules.datasets import ImageStore
from datamodules.errors import DataError, RobucapError
from datamodules.formats import load_split
from lightning_app.cli import main

REPO = Path(__file__).resolve().parents[1]

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


# ------------------------------------------------------------------- the right words


def _remove_train(fmt: str, root: Path) -> None:
    """Take the train split away from a dataset written by ``WRITERS[fmt]`` (val and test stay)."""
    if fmt == "coco":
        (root / "annotations" / "captions_train.json").unlink()
    elif fmt == "karpathy":
        path = root / "dataset_flickr30k.json"
        value = json.loads(path.read_text())
        value["images"] = [image for image in value["images"] if image["split"] != "train"]
        path.write_text(json.dumps(value))
    elif fmt == "flickr8k":
        (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").unlink()
    else:
        path = root / "captions.jsonl"
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["split"] != "train"]
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_tokenizer_advice_when_train_is_missing(fmt: str, tmp_path: Path) -> None:
    """The tokenizer advice stays for the one case it fixes: data without a train split and no tokenizer given."""
    root = tmp_path / fmt
    WRITERS[fmt](root)
    _remove_train(fmt, root)
    dm = CaptionDataModule(format=fmt, root=str(root), image_size=32, progress=False)
    advice = r"^cannot build a tokenizer without the training captions \(.+\); pass data\.tokenizer=<directory> or "
    with pytest.raises(DataError, match=advice):
        dm.setup("validate")


def _missing_image(root: Path) -> tuple[str, str]:
    data = write_flickr8k(root)
    data.paths[min(data.splits["train"])].unlink()
    return "flickr8k", str(root)


def _bad_json(root: Path) -> tuple[str, str]:
    write_coco(root)
    (root / "annotations" / "captions_train.json").write_text('{"images": [,]}')
    return "coco", str(root)


def _wordless_caption(root: Path) -> tuple[str, str]:
    write_image(root / "a.png", 0)
    (root / "captions.jsonl").write_text('{"image": "a.png", "caption": "? !", "split": "train"}\n')
    return "folder", str(root)


@pytest.mark.parametrize(
    "make",
    [
        _missing_image,
        _bad_json,
        _wordless_caption,
        lambda root: ("tfrecord", str(root)),  # unknown format
        lambda root: ("coco", str(root / "nope")),  # missing root
    ],
    ids=["missing-image", "bad-json", "wordless-caption", "unknown-format", "missing-root"],
)
def test_data_errors_pass_through_the_tokenizer(make: Callable[[Path], tuple[str, str]], tmp_path: Path) -> None:
    """Data errors reach the user as the loader wrote them, without the tokenizer advice."""
    fmt, root = make(tmp_path)
    with pytest.raises(DataError) as direct:
        load_split(fmt, root, "train")
    with pytest.raises(DataError) as through:
        CaptionDataModule(format=fmt, root=root, image_size=32, progress=False).setup("fit")
    assert str(through.value) == str(direct.value)
    assert "tokenizer" not in str(through.value)


def _corrupt_second_train_image(root: Path) -> Path:
    data = write_flickr8k(root, n_images=3)
    path = data.paths[sorted(data.splits["train"])[1]]
    path.write_bytes(b"this is not a JPEG")
    return path


def _lines(err: str) -> list[str]:
    # Only "\n" ends a line in a log; a "\r" (what tqdm uses to redraw) leaves the text on the bar's line.
    return err.split("\n")


def test_decoding_error_starts_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An image that fails to decode under the progress bar is reported on a line of its own."""
    bad = _corrupt_second_train_image(tmp_path)
    records = load_split("flickr8k", tmp_path, "train")
    with pytest.raises(DataError) as error:
        ImageStore(records, 16, cache=True, progress=True)
    print(f"robucap: error: {error.value}", file=sys.stderr)  # what the CLI does with it
    err = capsys.readouterr().err
    assert "decoding images" in err  # the bar was drawn
    assert f"robucap: error: {bad} is not a readable image" in _lines(err)[-2]
    assert _lines(err)[-2].startswith("robucap: error:")


def test_cli_decoding_error_starts_its_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``robucap fit`` on flickr8k with a corrupt image, progress on: one clean error line."""
    bad = _corrupt_second_train_image(tmp_path / "flickr8k")
    monkeypatch.chdir(tmp_path)
    code = main(
        ["fit", "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
         "--data.format", "flickr8k", "--data.root", str(tmp_path / "flickr8k"), "--data.image_size", "32",
         "--data.progress", "true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "decoding images" in err
    errors = [line for line in _lines(err) if "robucap: error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"robucap: error: {bad} is not a readable image"), err
