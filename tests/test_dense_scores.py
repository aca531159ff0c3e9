"""What lies under DAG's scores: per-class IoU of a confusion matrix and the detector's object recall, each
checked against an independent computation (torchmetrics) or a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_jaccard_index

from modules.dense_victims_eval import object_recall
from modules.segmentation import class_iou, mean_iou


def test_class_iou_is_torchmetrics_per_class_jaccard_and_its_nanmean_is_mean_iou() -> None:
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 9, 9), generator=generator)  # class 4 and 5 absent from the masks
    prediction = torch.randint(0, 5, (2, 9, 9), generator=generator)  # class 5 absent from both
    confusion = multiclass_confusion_matrix(prediction, target, 6)
    ours = class_iou(confusion)
    reference = multiclass_jaccard_index(prediction, target, 6, average="none")
    assert torch.allclose(ours[:5].float(), reference[:5])
    assert math.isnan(float(ours[5]))  # absent everywhere: not 0, so that means leave it out
    assert float(ours[~ours.isnan()].mean()) == pytest.approx(mean_iou(confusion), abs=1e-6)


def test_class_iou_hand_worked() -> None:
    # rows: truth, columns: prediction. Class 0: tp 6, fp 1 (a class-1 pixel called 0), fn 2 -> 6 / 9.
    confusion = torch.tensor([[6, 2], [1, 3]])
    assert class_iou(confusion).tolist() == pytest.approx([6 / 9, 3 / 6])


def _found(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_object_recall_hand_worked() -> None:
    truth = [
        {  # two objects and a crowd box (left out)
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
            "labels": torch.tensor([1, 2, 3]),
            "iscrowd": torch.tensor([0, 0, 1]),
        },
        {"boxes": torch.tensor([[0.0, 0, 8, 8]]), "labels": torch.tensor([4]), "iscrowd": torch.tensor([0])},
    ]
    found = [
        _found(
            # object 1: its class at 0.3 under a wrong class at 0.9 (found, not first); object 2: only a wrong class
            # and its own class on a box that misses (IoU 25/175 < 0.5)
            [[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [25, 25, 35, 35]],
            [0.3, 0.9, 0.8, 0.95],
            [1, 3, 5, 2],
        ),
        _found([[0, 0, 8, 8]], [0.6], [4]),  # found and first
    ]
    assert object_recall(found, truth) == {"recall50": pytest.approx(2 / 3), "top1_50": pytest.approx(1 / 3)}
    nothing = [_found([], [], []), _found([], [], [])]
    assert object_recall(nothing, truth) == {"recall50": 0.0, "top1_50": 0.0}
    assert object_recall([_found([], [], [])], [{k: v[2:] for k, v in truth[0].items()}]) == {
        "recall50": -1.0,
        "top1_50": -1.0,
    }
