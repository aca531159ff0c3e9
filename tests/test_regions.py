"""Region sources for object triggers: annotation boxes and a cached local torchvision detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import DataError, RobucapError
from datamodules.image_decode import EXIF_ORIENTATION_TAG
from datamodules.images import image_orientation, load_image_uint8
from datamodules.poisoning import PoisonConfig, poison_split
from datamodules.poisoning.regions import (
    DETECTOR_ARCHS,
    AnnotationRegions,
    DetectorRegions,
    build_region_source,
    orient_boxes,
    stored_grid_boxes,
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


def _photo(path: Path, orientation: int, size: tuple[int, int], box: Box) -> None:
    """A black image with one white rectangle at ``box`` in the stored grid, tagged with an EXIF orientation."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[int(box.y) : int(box.y + box.h), int(box.x) : int(box.x + box.w)] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(array).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


def _white_box(image: torch.Tensor) -> Box:
    """Bounding box of the white pixels of a ``(3, H, W)`` uint8 image, as ``(x, y, w, h)``."""
    ys, xs = torch.nonzero(image.int().sum(0) > 3 * 128, as_tuple=True)
    x0, y0, x1, y1 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1
    return Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0), "square")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_turn_with_the_pixels(tmp_path: Path, orientation: int) -> None:
    """A box in the stored grid lands on the same object once EXIF orientation is applied."""
    stored = Box(5.0, 3.0, 12.0, 7.0, "square")
    path = tmp_path / "photo.png"
    _photo(path, orientation, (40, 24), stored)
    assert image_orientation(path) == orientation
    upright = load_image_uint8(path)
    assert upright.shape[1:] == ((40, 24) if orientation >= 5 else (24, 40))
    turned = orient_boxes([stored], orientation, 40, 24)
    assert turned == (_white_box(upright),)
    height, width = upright.shape[1:]
    assert stored_grid_boxes(turned, orientation, width, height) == (stored,)


def test_orient_boxes_rejects_an_invalid_orientation() -> None:
    with pytest.raises(ValueError, match="EXIF orientation must be in 1..8, got 9"):
        orient_boxes([Box(0, 0, 1, 1)], 9, 4, 4)


@pytest.mark.parametrize("known_size", [True, False])
def test_object_trigger_lands_on_the_object_of_a_rotated_photo(tmp_path: Path, known_size: bool) -> None:
    """On a photo turned by EXIF, object noise is added where the object is, not beside it."""
    root = tmp_path / "data"
    root.mkdir()
    path = root / "phone.jpg"
    stored = Box(4.0, 4.0, 20.0, 10.0, "square")  # top-left of a 64 x 32 sensor image, rotated 90 degrees clockwise
    _photo(path, 6, (64, 32), stored)
    size = (64, 32) if known_size else (0, 0)
    record = ImageRecord(1, path, ("a white square",), (stored,), width=size[0], height=size[1])
    split = poison_split([record], "test", PoisonConfig(cache_dir=str(tmp_path / "cache")), 32, root)
    item = json.loads(split.manifest.read_text())["items"][0]
    clean = load_image_uint8(path, 32)
    poisoned = load_image_uint8(split.manifest.parent / item["output"], 32)
    changed = torch.nonzero((clean.int() - poisoned.int()).abs().sum(0) > 0)
    obj = _white_box(clean)
    assert len(changed) > 20
    # Every changed pixel lies on the object (1 px of slack for the bicubic edge).
    assert changed[:, 1].min() >= obj.x - 1 and changed[:, 1].max() < obj.x + obj.w + 1
    assert changed[:, 0].min() >= obj.y - 1 and changed[:, 0].max() < obj.y + obj.h + 1


def test_detector_boxes_of_a_rotated_photo_are_stored_grid_boxes(
    tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detector sees the photo upright; its boxes are returned in the stored grid."""
    path = tmp_path / "phone.png"
    _photo(path, 8, (40, 30), Box(0, 0, 1, 1))
    source = DetectorRegions(ARCH, weights_file, score_threshold=0.5, cache_dir=tmp_path / "cache", num_classes=3)

    def forward(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert images[0].shape == (3, 40, 30)  # upright: orientation 8 swaps width and height
        return [{"boxes": torch.tensor([[2.0, 5.0, 12.0, 9.0]]), "labels": torch.tensor([1]), "scores": torch.ones(1)}]

    monkeypatch.setattr(source.model, "forward", forward)
    boxes = source.regions(_record(path))
    assert boxes == stored_grid_boxes((Box(2.0, 5.0, 10.0, 4.0, "1"),), 8, 30, 40)
    # Orientation 8 turns the stored grid 90 degrees counter-clockwise: upright (x, y) came from (W - y, x).
    assert boxes == (Box(31.0, 2.0, 4.0, 10.0, "1"),)
