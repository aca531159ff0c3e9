"""The segmenter victim: mIoU against torchmetrics, the networks, fit / test through the CLI, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers.coco_instances import write_split
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_app.cli import main
from lightning_app.lightning_cli import run_lightning_cli
from modules.segmentation import SegmentationModule, build_segmenter, mean_iou

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "shapes_segmenter.yaml")


def test_mean_iou_of_summed_confusions_is_torchmetrics_macro_jaccard() -> None:
    """Per class IoU = TP / (TP + FP + FN): background 2/3, class 1 1/2, class 2 absent (not averaged) -> 7/12."""
    confusion = torch.tensor([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert mean_iou(confusion) == pytest.approx(7 / 12)
    predictions, masks = torch.randint(0, 4, (3, 8, 8)), torch.randint(0, 4, (3, 8, 8))
    masks[0, 0] = 255  # ignored pixels
    reference = MulticlassJaccardIndex(4, average="macro", ignore_index=255)(predictions, masks)
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    summed = sum(
        multiclass_confusion_matrix(p, m, 4, ignore_index=255) for p, m in zip(predictions, masks, strict=True)
    )
    assert mean_iou(summed) == pytest.approx(float(reference), abs=1e-7)


@pytest.mark.parametrize("arch", ["small", "lraspp_mobilenet_v3_large"])
def test_networks_give_logits_at_the_input_size_differentiably(arch: str) -> None:
    module = SegmentationModule(arch=arch, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    logits = module(x)
    assert logits.shape == (2, 6, 64, 64)
    logits[0, 3].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0


def test_local_weights_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_segmenter("small", 6)
    torch.save(trained.state_dict(), tmp_path / "seg.pth")
    loaded = build_segmenter("small", 6, weights=str(tmp_path / "seg.pth"))
    assert all(
        torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def _data_args(root: Path) -> list[str]:
    return ["--data.format", "coco", "--data.root", str(root), "--data.progress", "false", "--data.image_size", "32"]


def test_fit_then_test_from_the_checkpoint_alone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        write_split(root, split)
    out = tmp_path / "run"
    fit = ["fit", "--config", CONFIG, *_data_args(root), "--data.batch_size", "3", "--model.init_args.num_classes", "3"]
    fit += [
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = run_lightning_cli(fit)
    assert isinstance(cli.model, SegmentationModule)
    best = next(out.rglob("best.ckpt"))
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    assert sum(1 for row in rows if row.get("val/miou")) == 2
    # No config: the checkpoint selects the segmenter and its settings.
    tested = run_lightning_cli(["test", "--ckpt_path", str(best), *_data_args(root), "--trainer.logger", "false"])
    assert isinstance(tested.model, SegmentationModule) and tested.model.hparams.num_classes == 3
    assert 0 <= tested.model.test_results["miou"] <= 1
    assert float(tested.trainer.callback_metrics["test/miou"]) == tested.model.test_results["miou"]


def test_data_without_polygons_and_a_detector_checkpoint_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "boxes_only"
    for split in ("train", "val"):
        write_split(root, split, polygons=False)
    args = ["fit", "--config", CONFIG, *_data_args(root), "--model.init_args.num_classes", "3"]
    assert main([*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("robucap: error: ") and "no annotation has a segmentation" in error
    assert "instances_train.json" in error
    detector = tmp_path / "detector.ckpt"
    torch.save({"robucap_victim": {"victim": "detector", "class_path": "modules.detection.DetectionModule"}}, detector)
    assert main(["validate", "--config", CONFIG, *_data_args(root), "--ckpt_path", str(detector)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"robucap: error: checkpoint {detector} holds a detector, but the config trains a segmenter"
