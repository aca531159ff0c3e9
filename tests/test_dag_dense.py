"""``robucap attack dag --victim detector|segmenter``: the paper's Table 1 on our victims, end to end.

Tiny victims trained for a few steps; the figures in ``results.json`` are checked against each other and against
the per-image records (perceptibility, iterations, the permuted control's draws), images without an object are
skipped and counted, and the permuted control is a permutation of the perturbation's rows and columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.coco_instances import write_split

from datamodules.instances import InstancesDataModule
from lightning_app.cli import main
from modules.dense import DenseVictimModule
from modules.dense_victims_eval import PERMUTATION_DRAWS, permute_rows_columns
from modules.detection import DetectionModule
from modules.segmentation import SegmentationModule

SIDE = 32
GAMMA = 8 / 255  # far above the paper's step, so that a few iterations move the tiny victims


def _fit(module: DenseVictimModule, datamodule: InstancesDataModule, steps: int, path: Path) -> Path:
    """Train ``module`` for ``steps`` steps (seed 0) and save a Lightning checkpoint (with the data settings)."""
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, six 32 px images per split, the last one without any object."""
    root = tmp_path_factory.mktemp("tiny_instances")
    for split in ("train", "val", "test"):
        write_split(root, split, size=SIDE)
    return root


def _tiny_data(root: Path) -> InstancesDataModule:
    return InstancesDataModule(format="coco", root=str(root), image_size=SIDE, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def tiny_detector(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = DetectionModule(num_classes=3, image_size=SIDE, warmup_steps=0)
    return _fit(module, _tiny_data(tiny_root), 2, tmp_path_factory.mktemp("det") / "detector.ckpt")


@pytest.fixture(scope="module")
def shapes_segmenter(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small segmenter trained long enough on the shapes data to segment its test images fairly well."""
    data = InstancesDataModule(format="coco", root=str(shapes_root), image_size=SIDE, batch_size=16, progress=False)
    module = SegmentationModule(image_size=SIDE, lr=1e-2, warmup_steps=0, schedule="constant")
    return _fit(module, data, 60, tmp_path_factory.mktemp("seg") / "segmenter.ckpt")


def _attack(checkpoint: Path, victim: str, out: Path, *options: str) -> dict[str, Any]:
    argv = ["attack", "dag", "--victim", victim, "--ckpt", str(checkpoint), "--gamma", str(GAMMA), "--examples",
            "2", "--device", "cpu", "--out", str(out), *options]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _check_figures(block: dict[str, Any], metrics: tuple[str, ...], iterations: int) -> list[dict[str, Any]]:
    """The block's figures against each other and the per-image records; returns the attacked images' records."""
    attacked = [r for r in block["records"] if r["objects"] > 0]
    assert block["n"] == len(attacked) > 0 and block["skipped"] == len(block["records"]) - len(attacked)
    for r in attacked:
        # Perceptibility sqrt(1/K sum_k ||r_k||^2), K = H * W pixels, r_k the RGB vector: l2 / sqrt(K).
        assert r["p"] == pytest.approx(r["l2"] / math.sqrt(SIDE * SIDE), rel=1e-6)
        # Every step's L-infinity norm is gamma, so r's is at most iterations * gamma.
        assert 0 <= r["iterations"] <= iterations and r["linf"] <= r["iterations"] * GAMMA + 1e-6
        assert r["success"] == (r["fooled"] == r["targets"]) and r["fooled"] <= r["targets"]
    assert block["p"] == pytest.approx(sum(r["p"] for r in attacked) / len(attacked))
    assert block["iterations"] == pytest.approx(sum(r["iterations"] for r in attacked) / len(attacked))
    assert len(block["perm_draws"]) == block["permutation_draws"] == PERMUTATION_DRAWS
    for metric in metrics:
        assert block[f"perm_{metric}"] == pytest.approx(sum(d[metric] for d in block["perm_draws"]) / 3)
        assert all(0.0 <= block[f"{kind}_{metric}"] <= 1.0 for kind in ("clean", "adv", "perm"))
    assert block["max_iterations"] == iterations and block["gamma"] == pytest.approx(GAMMA)
    return attacked


def test_detector_table_and_skipped_images(tiny_detector: Path, tiny_root: Path, tmp_path: Path) -> None:
    results = _attack(tiny_detector, "detector", tmp_path / "run", "--images", "6", "--batch_size", "4",
                      "--max_iterations", "3")  # fmt: skip
    block = results["dense"]["detector"]
    attacked = _check_figures(block, ("map50", "map", "recall50", "top1_50"), 3)
    # The last test image has no object: skipped, counted, kept in place among the records.
    assert block["skipped"] == 1 and block["records"][-1]["objects"] == 0 and block["records"][-1]["image_id"] == 6
    assert [r["image_id"] for r in block["records"]] == [1, 2, 3, 4, 5, 6]
    assert all(r["objects"] == 2 for r in attacked) and sum(r["targets"] for r in attacked) > 0
    assert results["data"]["root"] == str(tiny_root) and results["data"]["split"] == "test"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "mAP@0.5 permuted" in report and "data:image/png" in report and "objects whose best detection" in report


def test_segmenter_table_dag_lowers_miou(shapes_segmenter: Path, tmp_path: Path) -> None:
    results = _attack(shapes_segmenter, "segmenter", tmp_path / "run", "--images", "6", "--batch_size", "4",
                      "--max_iterations", "10")  # fmt: skip
    block = results["dense"]["segmenter"]
    _check_figures(block, ("miou", "iou_background", "miou_foreground"), 10)
    # A victim that segments the clean images: DAG, at this step size, must take much of it away.
    assert block["clean_miou"] > 0.2
    assert block["adv_miou"] < block["clean_miou"] - 0.05
    # DAG leaves the background alone: the object classes lose more than the background does.
    assert (
        block["clean_miou_foreground"] - block["adv_miou_foreground"]
        > block["clean_iou_background"] - block["adv_iou_background"]
    )
    report = (tmp_path / "run" / "report.html").read_text()
    assert "mIoU DAG" in report and "mean IoU of the object classes" in report


def test_segmenter_needs_polygons(shapes_segmenter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "boxes_only"
    write_split(root, "test", size=SIDE, polygons=False)
    argv = ["attack", "dag", "--victim", "segmenter", "--ckpt", str(shapes_segmenter), "--data_root", str(root),
            "--format", "coco", "--device", "cpu", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error: ") and "a segmenter needs masks" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_permuted_control_permutes_rows_and_columns() -> None:
    """A hand-made r of distinct values: each image's output is r with one row and one column permutation applied
    to every channel alike, drawn per image from the seeded generator."""
    b, c, h, w = 3, 3, 5, 7
    r = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)
    out = permute_rows_columns(r, torch.Generator().manual_seed(0))
    again = permute_rows_columns(r, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    orders = []
    for k in range(b):
        local = (out[k] - r[k, 0, 0, 0]).long()  # channel * h * w + row * w + column of the source entry
        rows, cols = (local[0] // w)[:, 0], (local[0] % w)[0]
        assert sorted(rows.tolist()) == list(range(h)) and sorted(cols.tolist()) == list(range(w))
        assert torch.equal(out[k], r[k][:, rows][:, :, cols])
        assert torch.equal(out[k].flatten().sort().values, r[k].flatten())  # the same values, moved
        orders.append((tuple(rows.tolist()), tuple(cols.tolist())))
    assert len(set(orders)) == b and any(o != (tuple(range(h)), tuple(range(w))) for o in orders)
