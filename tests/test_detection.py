"""The detector victim: mAP on a hand-worked case, what attacks call, local weights, fit / validate through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers.coco_instances import write_split

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.dense_cli import dense_victim
from lightning_app.lightning_cli import run_lightning_cli
from modules.detection import DetectionModule, build_detector, mean_average_precision

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "shapes_detector.yaml")


def _record(image_id: int, boxes: list[list[float]], scores: list[float], truth: list[float]) -> dict[str, object]:
    return {
        "image_id": image_id,
        "pred": {
            "boxes": torch.tensor(boxes),
            "scores": torch.tensor(scores),
            "labels": torch.ones(len(boxes), dtype=torch.long),
        },
        "target": {"boxes": torch.tensor([truth]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([0])},
    }


def test_map_on_a_hand_worked_case() -> None:
    """Ranked detections: a hit (0.9), a miss (0.8), then a box of IoU 0.62 with the second object (0.7).

    COCO's AP samples the interpolated precision at 101 recall points. Where the last box counts (IoU thresholds
    0.5, 0.55, 0.6) recall 0.5 has precision 1 and recall 1 precision 2/3: AP = (51 + 50 · 2/3) / 101. At the 7
    stricter thresholds recall stops at 0.5: AP = 51 / 101. mAP averages the 10 thresholds.
    """
    records = [
        _record(1, [[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [0, 0, 10, 10]),
        _record(2, [[0, 0, 10, 6.2]], [0.7], [0, 0, 10, 10]),
    ]
    scores = mean_average_precision(records)
    full, half = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert scores["map50"] == pytest.approx(full, abs=1e-6)
    assert scores["map"] == pytest.approx((3 * full + 7 * half) / 10, abs=1e-6)


def test_images_evaluated_twice_count_once() -> None:
    """DDP pads the last batches with repeated images; the detector's scores de-duplicate them by image id."""
    module = DetectionModule(image_size=32)
    once = [_record(1, [[0, 0, 10, 10]], [0.9], [0, 0, 10, 10]), _record(2, [[0, 0, 4, 4]], [0.8], [0, 0, 10, 10])]
    module.eval_records = once + [once[1]]
    assert module._scores() == mean_average_precision(once)
    assert mean_average_precision(once + [{**once[1], "image_id": 3}]) != mean_average_precision(once)


def test_proposals_are_fixed_and_their_logits_differentiable() -> None:
    torch.manual_seed(0)
    module = DetectionModule(image_size=64).train()
    images = torch.rand(2, 3, 64, 64)
    proposals = module.proposals(images, nms_threshold=0.9, max_proposals=300)
    assert module.training and all(m.training for m in module.modules())  # the mode is restored
    again = module.proposals(images, nms_threshold=0.9, max_proposals=300)
    assert all(torch.equal(a, b) for a, b in zip(proposals, again, strict=True))
    assert all(0 < len(p) <= 300 for p in proposals)
    assert module.model.rpn.nms_thresh == 0.7 and module.model.rpn._post_nms_top_n["testing"] == 100  # restored
    module.eval()
    x = images.clone().requires_grad_(True)
    logits = module.proposal_logits(x, proposals)
    assert [tuple(t.shape) for t in logits] == [(len(p), 6) for p in proposals]
    logits[1][:, 2].sum().backward()
    assert x.grad[1].abs().sum() > 0 and x.grad[0].abs().sum() == 0  # image 1's logits depend on image 1 only
    found = module.detect(images)
    assert set(found[0]) == {"boxes", "scores", "labels"}


def test_local_weights_load_and_a_missing_file_is_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_detector("small", 6, 64)
    file = tmp_path / "detector.pth"
    torch.save(trained.state_dict(), file)
    loaded = build_detector("small", 6, 64, weights=str(file))
    assert all(
        torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    # Weights trained on another number of classes: everything but the class-specific predictor is taken.
    other = build_detector("small", 4, 64, weights=str(file))
    assert torch.equal(other.backbone[0][0].weight, trained.backbone[0][0].weight)
    assert other.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(RobucapError, match="weights file .*missing.pth does not exist") as caught:
        build_detector("small", 6, 64, weights=str(tmp_path / "missing.pth"))
    assert "\n" not in str(caught.value)
    with pytest.raises(RobucapError, match="model.arch must be one of"):
        build_detector("yolo", 6, 64)


def test_torchvision_builder_takes_the_image_size_unchanged() -> None:
    model = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 6, 64)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    assert model.roi_heads.box_predictor.cls_score.out_features == 6


@pytest.fixture(scope="module")
def instances_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("instances")
    for split in ("train", "val", "test"):
        write_split(root, split)
    return root


def _data_args(root: Path) -> list[str]:
    return ["--data.format", "coco", "--data.root", str(root), "--data.progress", "false"]


def test_fit_then_validate_from_the_checkpoint_alone(instances_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit = ["fit", "--config", CONFIG, *_data_args(instances_root), "--data.image_size", "32", "--data.batch_size", "3"]
    fit += ["--model.init_args.num_classes", "3", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(out)]
    fit += ["--trainer.enable_progress_bar", "false"]
    cli = run_lightning_cli(fit)
    assert isinstance(cli.model, DetectionModule)
    fitted = float(cli.trainer.callback_metrics["val/map50"])
    best = next(out.rglob("best.ckpt"))
    assert next(out.rglob("last.ckpt")).is_file()
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    assert any(row.get("val/map50") for row in rows) and any(row.get("train/epoch_loss") for row in rows)
    assert list(out.rglob("wandb/offline-run-*"))  # the captioners' W&B logger, offline
    assert dense_victim(["validate", "--ckpt_path", str(best)]) == "detector"
    # No config: the checkpoint selects the detector, its classes and its image size (the data default is 128).
    validate = ["validate", "--ckpt_path", str(best), *_data_args(instances_root), "--trainer.logger", "false"]
    again = run_lightning_cli(validate)
    assert again.model.hparams.image_size == 32 and again.datamodule.image_size == 32
    assert float(again.trainer.callback_metrics["val/map50"]) == pytest.approx(fitted, abs=1e-9)


def test_wrong_checkpoints_and_classes_are_one_line_errors(
    instances_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "captioner.ckpt"
    torch.save({"hyper_parameters": {"lr": 1.0}, "state_dict": {}}, foreign)
    base = ["validate", "--config", CONFIG, *_data_args(instances_root), "--trainer.logger", "false"]
    assert main([*base, "--ckpt_path", str(foreign), "--model.init_args.num_classes", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("robucap: error: checkpoint") and "holds no detector" in error and "\n" not in error
    # The shapes config says 6 classes, the data has 2 categories.
    assert main([*base, "--data.image_size", "32"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.num_classes is 6 but the data has 2 categories" in error
