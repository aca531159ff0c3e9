"""COCO instances for the dense victims: items, boxes and masks against hand-computed ones, shapes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.coco_instances import rectangle, write_instances

from datamodules.errors import DataError, RobucapError
from datamodules.instances import IGNORE_INDEX, InstancesDataModule, collate_instances, load_instances


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a binary mask (column-major, starting with a run of zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """Three 40×20 images: a rectangle of category 7, no object, and a crowd (RLE) next to a category-3 box."""
    crowd = np.zeros((20, 40), dtype=np.uint8)
    crowd[0:4, 0:10] = 1
    annotations = [
        {**rectangle(7, 8, 4, 16, 6), "image_id": 1},
        {**rectangle(3, 20, 10, 10, 8), "image_id": 3},
        {
            "image_id": 3,
            "category_id": 7,
            "bbox": [0, 0, 10, 4],
            "segmentation": {"size": [20, 40], "counts": _runs(crowd)},
            "iscrowd": 1,
        },
    ]
    write_instances(tmp_path, "val", [(1, 40, 20), (2, 40, 20), (3, 40, 20)], annotations)
    return tmp_path


def _module(root: Path, **options: object) -> InstancesDataModule:
    return InstancesDataModule(format="coco", root=str(root), image_size=20, progress=False, **options)


def test_items_scale_boxes_and_rasterise_polygons_at_the_output_size(coco_root: Path) -> None:
    data = _module(coco_root)
    data.setup("validate")
    assert data.categories == ("box", "ring")  # ids 3 and 7 -> labels 1 and 2
    first, empty, crowded = (data.datasets["val"][i] for i in range(3))
    assert first.image.shape == (3, 20, 20) and 0 <= first.image.min() <= first.image.max() <= 1
    # x is halved (40 -> 20 px), y unchanged (20 -> 20 px).
    assert first.boxes.tolist() == [[4.0, 4.0, 12.0, 10.0]] and first.labels.tolist() == [2]
    expected = torch.zeros(20, 20, dtype=torch.long)
    expected[4:10, 4:12] = 2  # pixels whose centres lie inside the scaled polygon
    assert torch.equal(first.mask, expected)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and not empty.mask.any()
    assert crowded.boxes.tolist() == [[10.0, 10.0, 15.0, 18.0]] and crowded.labels.tolist() == [1]
    assert crowded.crowd_boxes.tolist() == [[0.0, 0.0, 5.0, 4.0]] and crowded.crowd_labels.tolist() == [2]
    expected = torch.zeros(20, 20, dtype=torch.long)
    expected[10:18, 10:15] = 1
    expected[0:4, 0:5] = IGNORE_INDEX  # the RLE, decoded at 40×20 and resized by nearest neighbour
    assert torch.equal(crowded.mask, expected)


def test_collate_stacks_images_and_masks_and_lists_boxes(coco_root: Path) -> None:
    data = _module(coco_root, batch_size=3)
    batch = next(iter(data.val_dataloader()))
    assert batch.image_ids == [1, 2, 3] and batch.images.shape == (3, 3, 20, 20) and batch.masks.shape == (3, 20, 20)
    assert [len(b) for b in batch.boxes] == [1, 0, 1]
    assert batch.targets()[0]["labels"].tolist() == [2]
    again = collate_instances([data.datasets["val"][i] for i in range(3)])
    assert torch.equal(again.images, batch.images) and torch.equal(again.masks, batch.masks)


def test_a_missing_instances_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    data = _module(tmp_path)
    with pytest.raises(DataError) as caught:
        data.setup("fit")
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "annotations" / "instances_train.json") in message


def test_an_annotation_of_an_unknown_category_is_refused(tmp_path: Path) -> None:
    path = write_instances(tmp_path, "train", [(1, 8, 8)], [{**rectangle(5, 1, 1, 2, 2), "image_id": 1}])
    with pytest.raises(DataError, match=r"annotations\[0\] has category_id 5, which is not in 'categories'") as e:
        load_instances(tmp_path, "train")
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "karpathy"}, "data.format must be one of shapes, coco"),
        ({"image_size": 8}, "data.image_size must be between 16"),
        ({"format_options": {"captions_file": "x"}}, "unknown option"),
        ({"limit_val": 0}, "data.limit_val must be >= 1"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        InstancesDataModule(**options)


def test_shapes_instances_masks_agree_with_boxes(shapes_root: Path) -> None:
    """The shapes data's polygons, rasterised at 64 px, fill their own (doubled) boxes with their own label."""
    shapes = {"n_train": 160, "n_val": 21, "n_test": 15, "image_size": 32, "seed": 3}  # the fixture's dataset
    data = InstancesDataModule(root=str(shapes_root), image_size=64, shapes=shapes, progress=False)
    data.prepare_data()  # the dataset is there with these settings: nothing is written
    data.setup("test")
    assert data.categories == ("circle", "square", "triangle", "diamond", "cross")
    split = load_instances(shapes_root, "test")
    for index in range(5):
        item = data.datasets["test"][index]
        source = split.images[index].objects
        assert torch.allclose(item.boxes, torch.tensor([[o.box.x, o.box.y, o.box.x + o.box.w, o.box.y + o.box.h]
                                                        for o in source]) * 2)  # fmt: skip
        for box, label in zip(item.boxes.long().tolist(), item.labels.tolist(), strict=True):
            x0, y0, x1, y1 = box
            inside = item.mask[y0:y1, x0:x1]
            assert (inside == label).float().mean() > 0.4  # the shape covers a good part of its own box
        outside = item.mask > 0
        for x0, y0, x1, y1 in item.boxes.long().tolist():
            # pycocotools' rasteriser may take a pixel more than the generator's pixel-centre rule at an edge.
            outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
        assert not outside.any()  # no object pixel away from every box


def test_shapes_are_generated_on_first_use_with_their_own_size(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    data = InstancesDataModule(
        root=str(root), image_size=32, shapes={"n_train": 3, "n_val": 2, "n_test": 2, "image_size": 16}, progress=False
    )
    data.prepare_data()
    data.setup("fit")
    item = data.datasets["train"][0]
    assert item.image.shape == (3, 32, 32) and item.mask.shape == (32, 32) and len(item.labels) >= 1
    assert load_instances(root, "train").images[0].width == 16  # generated at 16 px, served at 32


def test_boxes_and_masks_turn_with_an_exif_rotated_image(tmp_path: Path) -> None:
    """Annotations refer to the stored pixel grid; the loader shows the image upright, so they must turn with it."""
    from PIL import Image

    write_instances(tmp_path, "val", [(1, 20, 10)], [{**rectangle(3, 2, 1, 6, 4), "image_id": 1}])
    stored = np.full((10, 20, 3), 230, dtype=np.uint8)
    stored[1:5, 2:8] = 20  # the annotated rectangle, dark
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "images" / "val" / "1.png", exif=exif.tobytes())
    data = _module(tmp_path)
    data.setup("validate")
    item = data.datasets["val"][0]
    dark = item.image.mean(dim=0) < 0.5
    inside = item.mask > 0
    assert (dark & inside).sum() / (dark | inside).sum() > 0.8  # the mask lies on the rectangle as shown
    ys, xs = torch.nonzero(inside, as_tuple=True)
    x0, y0, x1, y1 = item.boxes[0].tolist()
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
