"""``robucap predict`` (a split or a folder of images) and the test split's predictions from ``robucap test``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.datamodule import CaptionDataModule
from datamodules.images import load_image
from lightning_app.cli import main
from modules.captioning import CaptioningModule

REPO = Path(__file__).resolve().parents[1]


def _args(root: Path, out: Path, checkpoint: Path, csv_logger: bool = False) -> list[str]:
    logger = ["--config", str(REPO / "configs/logger/csv.yaml")] if csv_logger else ["--trainer.logger", "false"]
    return [
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        *logger,
        "--data.format", "coco",
        "--data.root", str(root),
        "--data.batch_size", "4",
        "--data.progress", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--ckpt_path", str(checkpoint),
    ]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _expected_captions(checkpoint: Path, files: list[Path], batch_size: int = 4) -> list[str]:
    """The module's own captions of ``files``, in batches of the CLI run's size (batching can move float sums)."""
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    size = module.hparams.image_size
    captions: list[str] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        captions += module.caption(torch.stack([load_image(f, size) for f in chunk]))
    return captions


def test_predict_writes_the_split_captions(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``robucap predict`` crashed (``predict_dataloader must be implemented``)."""
    assert main(["predict", *_args(shapes_root, tmp_path, trained_checkpoint)]) == 0
    path = tmp_path / "predictions.jsonl"  # no logger: the run directory is default_root_dir
    assert f"captions of 15 images written to {path}" in capsys.readouterr().out
    rows = _rows(path)
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, progress=False)
    test = dm.load_records("test")
    assert sorted(r["image_id"] for r in rows) == sorted(r.image_id for r in test)
    assert {r["file"] for r in rows} == {str(r.path) for r in test}
    captions = _expected_captions(trained_checkpoint, [r.path for r in test])
    expected = dict(zip([r.image_id for r in test], captions, strict=True))
    assert {r["image_id"]: r["caption"] for r in rows} == expected


def test_predict_a_folder_of_images(trained_checkpoint: Path, shapes_root: Path, tmp_path: Path) -> None:
    """A folder of the user's own images, any kind Pillow reads, nested folders included;
    other files and hidden files are skipped."""
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(folder / "holiday" / "b.JPG")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(folder / "c.webp")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / ".thumb.png")
    out = tmp_path / "out"
    args = [*_args(shapes_root, out, trained_checkpoint), "--data.predict_images", str(folder)]
    assert main(["predict", *args]) == 0
    rows = _rows(out / "predictions.jsonl")
    assert [r["image_id"] for r in rows] == ["a.png", "c.webp", "holiday/b.JPG"]
    files = [Path(r["file"]) for r in rows]
    assert files == [folder / "a.png", folder / "c.webp", folder / "holiday" / "b.JPG"]
    assert [r["caption"] for r in rows] == _expected_captions(trained_checkpoint, files)


def test_predict_folder_errors_are_one_line(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``predict`` failures are one ``robucap: error:`` line, exit 2."""
    args = _args(shapes_root, tmp_path, trained_checkpoint)
    assert main(["predict", *args, "--data.predict_images", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Before it, one information line: the config's 64 px yields to the checkpoint's 32.
    assert [line for line in err if line.startswith("robucap: error:")] == [err[-1]]
    assert err[-1] == (
        f"robucap: error: data.predict_images {tmp_path / 'nope'} is not a directory; expected a folder of image files"
    )
    (tmp_path / "empty").mkdir()
    assert main(["predict", *args, "--data.predict_images", str(tmp_path / "empty")]) == 2
    assert "holds no image file" in capsys.readouterr().err
    assert main(["predict", *args, "--data.predict_split", "dev"]) == 2
    assert "data.predict_split must be one of train, val, test, got 'dev'" in capsys.readouterr().err


def test_test_writes_predictions_next_to_its_metrics(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """``robucap test`` wrote no predictions; now ``predictions.jsonl`` (with references) and
    ``test_metrics.json`` sit next to the CSV logger's ``metrics.csv``."""
    assert main(["test", *_args(shapes_root, tmp_path, trained_checkpoint, csv_logger=True)]) == 0
    (metrics_csv,) = list(tmp_path.rglob("metrics.csv"))
    rows = _rows(metrics_csv.parent / "predictions.jsonl")
    assert len(rows) == 15 and all(r["references"] and Path(r["file"]).is_file() for r in rows)
    scores = json.loads((metrics_csv.parent / "test_metrics.json").read_text())
    with open(metrics_csv, encoding="utf-8") as fh:
        logged = next(row for row in csv.DictReader(fh) if row.get("test/bleu4"))
    assert scores["test/bleu4"] == pytest.approx(float(logged["test/bleu4"]), abs=1e-6)
    assert scores["test/cider"] == pytest.approx(float(logged["test/cider"]), abs=1e-6)
