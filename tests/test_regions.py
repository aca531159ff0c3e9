"""Region sources for object triggers: annotation boxes and a cached local torchvision detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from datamodules.errors import DataError, RobucapError
from datamodules.poisoning.regions import (
    DETECTOR_ARCHS,
    AnnotationRegions,
    DetectorRegions,
    build_region_source,
)
from datamodules.records import Box, ImageRecord

ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _image(tmp_path: Path, name: str = "a.png", size: tuple[int, int] = (40, 30)) -> Path:
    path = tmp_path / name
    Image.new("RGB", size, (200, 50, 50)).save(path)
    return path


def _record(path: Path, image_id: int | str = 1, boxes: tuple[Box, ...] = ()) -> ImageRecord:
    return ImageRecord(image_id=image_id, path=path, captions=("a red square",), boxes=boxes)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchvision.models import detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path_factory.mktemp("weights") / "detector.pth"
    torch.save(model.state_dict(), path)
    return path


def _fake_forward(calls: list[int]) -> Any:
    def forward(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        calls.append(len(images))
        assert images[0].shape == (3, 30, 40)
        return [
            {
                "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.0, 7.0], [3.0, 3.0, 3.0, 9.0]]),
                "labels": torch.tensor([2, 1, 1]),
                "scores": torch.tensor([0.4, 0.9, 0.95]),
            }
        ]

    return forward


def test_annotation_regions_return_record_boxes() -> None:
    boxes = (Box(1, 2, 3, 4, "circle"), Box(0, 0, 5, 5, "square"))
    source = AnnotationRegions()
    record = _record(Path("/x.png"), boxes=boxes)
    source.check([record, _record(Path("/y.png"), 2)])
    assert source.regions(record) == boxes
    assert build_region_source("annotations").regions(record) == boxes


def test_annotation_regions_reject_split_without_boxes() -> None:
    with pytest.raises(DataError, match=r"train has no object boxes \(no instances_\*\.json\).*'detector'.*badnets"):
        AnnotationRegions().check([_record(Path("/x.png"))], split="train")


def test_detector_runs_once_and_caches(tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = DetectorRegions(ARCH, weights_file, score_threshold=0.5, cache_dir=tmp_path / "cache", num_classes=3)
    calls: list[int] = []
    monkeypatch.setattr(source.model, "forward", _fake_forward(calls))
    record = _record(_image(tmp_path), image_id="img/1")
    expected = (Box(5.0, 5.0, 1.0, 2.0, "1"),)  # 0.4 is below threshold, the zero-width box is dropped
    assert source.regions(record) == expected
    assert source.regions(record) == expected
    assert calls == [1]
    path = source.cache_path(record)
    assert path.parent.parent == tmp_path / "cache" and path.is_file() and "/" not in path.name
    assert json.loads(path.read_text())["boxes"] == [[5.0, 5.0, 1.0, 2.0, "1"]]
    # A fresh source with the same detector identity reads the cache without running detection.
    again = DetectorRegions(ARCH, weights_file, score_threshold=0.5, cache_dir=tmp_path / "cache", num_classes=3)
    monkeypatch.setattr(again.model, "forward", _fake_forward(calls))
    assert again.regions(record) == expected and calls == [1]
    # A corrupt cache file is recomputed.
    path.write_text("{not json")
    assert again.regions(record) == expected and calls == [1, 1]


def test_cache_key_depends_on_detector_dataset_and_image(tmp_path: Path, weights_file: Path) -> None:
    def make(**options: Any) -> DetectorRegions:
        base: dict[str, Any] = {"arch": ARCH, "weights": weights_file, "cache_dir": tmp_path, "num_classes": 3}
        return DetectorRegions(**{**base, **options})

    first = make(score_threshold=0.5, dataset_key="shapes")
    record = _record(_image(tmp_path), image_id=1)
    assert make(score_threshold=0.5, dataset_key="shapes").cache_path(record) == first.cache_path(record)
    assert make(score_threshold=0.3, dataset_key="shapes").cache_dir != first.cache_dir
    assert make(score_threshold=0.5, dataset_key="coco").cache_dir != first.cache_dir
    assert first.cache_path(record) != first.cache_path(_record(record.path, image_id=2))
    other_weights = tmp_path / "other.pth"
    state = torch.load(weights_file, weights_only=True)
    state = {name: value + 1 if value.is_floating_point() else value for name, value in state.items()}
    torch.save(state, other_weights)
    assert make(weights=other_weights, score_threshold=0.5, dataset_key="shapes").cache_dir != first.cache_dir
    # Without a dataset key the image path tells apart images with equal ids.
    plain = make()
    assert plain.cache_path(record) != plain.cache_path(_record(_image(tmp_path, "b.png"), image_id=1))


def test_detector_real_forward_gives_source_pixel_boxes(tmp_path: Path, weights_file: Path) -> None:
    source = DetectorRegions(ARCH, weights_file, score_threshold=0.0, cache_dir=tmp_path, num_classes=3)
    record = _record(_image(tmp_path, size=(48, 32)))
    boxes = source.regions(record)
    assert source.regions(record) == boxes
    for box in boxes:
        assert box.category in {"1", "2"}
        assert 0 <= box.x and box.x + box.w <= 48 + 1e-3 and box.w > 0
        assert 0 <= box.y and box.y + box.h <= 32 + 1e-3 and box.h > 0


def test_detector_loads_safetensors(tmp_path: Path, weights_file: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(weights_file, weights_only=True)
    path = tmp_path / "detector.safetensors"
    save_file({name: value.contiguous() for name, value in state.items()}, str(path))
    source = DetectorRegions(ARCH, path, cache_dir=tmp_path, num_classes=3)
    assert not source.model.training


def test_detector_missing_weights_file_names_file_and_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        DataError, match=rf"{missing}.*does not exist.*state_dict of a torchvision {ARCH}.*num_classes=3"
    ):
        DetectorRegions(ARCH, missing, cache_dir=tmp_path, num_classes=3)


def test_detector_weights_that_do_not_fit(tmp_path: Path, weights_file: Path) -> None:
    with pytest.raises(DataError, match=r"does not fit: .*size mismatch.*num_classes=91"):
        DetectorRegions(ARCH, weights_file, cache_dir=tmp_path, num_classes=91)
    partial = tmp_path / "partial.pth"
    state = torch.load(weights_file, weights_only=True)
    torch.save({name: value for name, value in state.items() if "roi_heads" not in name}, partial)
    with pytest.raises(DataError, match=r"partial.pth does not fit: .*Missing key"):
        DetectorRegions(ARCH, partial, cache_dir=tmp_path, num_classes=3)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"garbage.pt cannot be read"):
        DetectorRegions(ARCH, garbage, cache_dir=tmp_path, num_classes=3)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(DataError, match=r"holds a list, not a state_dict"):
        DetectorRegions(ARCH, not_dict, cache_dir=tmp_path, num_classes=3)


def test_detector_option_errors(tmp_path: Path, weights_file: Path) -> None:
    with pytest.raises(RobucapError, match=r"arch must be one of .*ssdlite320_mobilenet_v3_large, got 'yolo'"):
        DetectorRegions("yolo", weights_file, cache_dir=tmp_path)
    for threshold in (-0.1, 1.5):
        with pytest.raises(RobucapError, match=r"score_threshold must be in \[0, 1\]"):
            DetectorRegions(ARCH, weights_file, score_threshold=threshold, cache_dir=tmp_path, num_classes=3)
    with pytest.raises(RobucapError, match="region source must be one of annotations, detector, got 'boxes'"):
        build_region_source("boxes")
    with pytest.raises(RobucapError, match="unknown options colour"):
        build_region_source("detector", weights=str(weights_file), colour="red")
    with pytest.raises(RobucapError, match="needs 'weights'"):
        build_region_source("detector")
    assert len(DETECTOR_ARCHS) == 4
    built = build_region_source("detector", arch=ARCH, weights=str(weights_file), cache_dir=tmp_path, num_classes=3)
    assert isinstance(built, DetectorRegions)
    built.check([])
