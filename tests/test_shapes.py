"""The procedural shapes dataset: COCO layout, exact boxes, captions, determinism, validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import coco

from datamodules.errors import DataError, RobucapError
from datamodules.shapes import (
    COLORS,
    SHAPE_KINDS,
    SIZES,
    SPLITS,
    ShapesConfig,
    generate_shapes,
    shapes_ready,
    shapes_vocabulary,
)

TINY = ShapesConfig(n_train=20, n_val=8, n_test=8, image_size=32, seed=3)


def _load(root: Path, kind: str, split: str) -> dict[str, Any]:
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def _digest(root: Path) -> dict[str, str]:
    """Hash of every file under root, keyed by its relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pixels(root: Path, split: str, file_name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / split / file_name))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    generate_shapes(out, TINY, progress=False)
    return out


def test_summary_and_layout(tmp_path: Path) -> None:
    out = tmp_path / "data"
    summary = generate_shapes(out, TINY, progress=False)
    assert summary == {
        "name": "shapes",
        "splits": {"train": 20, "val": 8, "test": 8},
        "image_size": 32,
        "seed": 3,
        "path": str(out),
    }
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "shapes" and meta["complete"] is True and isinstance(meta["format_version"], int)
    assert meta["config"] == {
        "n_train": 20,
        "n_val": 8,
        "n_test": 8,
        "image_size": 32,
        "seed": 3,
        "min_objects": 1,
        "max_objects": 3,
        "captions_per_image": 5,
    }


def test_coco_json_and_images(tiny: Path) -> None:
    seen_ids: set[int] = set()
    caption_ids: set[int] = set()
    instance_ids: set[int] = set()
    for split, count in TINY.split_sizes().items():
        caps, inst = _load(tiny, "captions", split), _load(tiny, "instances", split)
        assert set(caps) == {"info", "licenses", "images", "annotations"}
        assert set(inst) == {"info", "licenses", "images", "annotations", "categories"}
        assert caps["images"] == inst["images"] and len(caps["images"]) == count
        assert inst["categories"] == [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_KINDS)
        ]
        files = sorted(p.name for p in (tiny / "images" / split).iterdir())
        assert files == sorted(img["file_name"] for img in caps["images"])
        for img in caps["images"]:
            assert set(img) == {"id", "file_name", "width", "height"}
            assert img["file_name"] == f"{img['id']:06d}.png"
            assert img["width"] == img["height"] == 32
            with Image.open(tiny / "images" / split / img["file_name"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
        ids = {img["id"] for img in caps["images"]}
        assert not ids & seen_ids, "image ids must be unique across splits"
        seen_ids |= ids
        for ann in caps["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"} and ann["image_id"] in ids
            caption_ids.add(ann["id"])
        for ann in inst["annotations"]:
            assert {"id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"} <= set(ann)
            assert ann["iscrowd"] == 0 and ann["image_id"] in ids
            instance_ids.add(ann["id"])
    n_images = len(seen_ids)
    assert len(caption_ids) == 5 * n_images, "caption ids must be unique across splits"
    assert len(instance_ids) == sum(len(_load(tiny, "instances", s)["annotations"]) for s in SPLITS)


def test_standard_coco_loader_reads_it(tiny: Path) -> None:
    caps = coco.COCO(str(tiny / "annotations" / "captions_val.json"))
    inst = coco.COCO(str(tiny / "annotations" / "instances_val.json"))
    assert len(caps.getImgIds()) == 8 and len(caps.getAnnIds()) == 40
    assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == list(SHAPE_KINDS)
    # pycocotools rasterises polygons with its own sub-pixel rule; it must still agree closely with the drawing.
    mismatch, total = 0, 0
    for ann in inst.dataset["annotations"]:
        img = _pixels(tiny, "val", f"{ann['image_id']:06d}.png")
        drawn = np.all(img == COLORS[ann["attributes"]["color"]], axis=-1)
        x, y, w, h = ann["bbox"]
        inside = np.zeros_like(drawn)
        inside[y : y + h, x : x + w] = True
        coco_mask = inst.annToMask(ann).astype(bool)
        mismatch += int((coco_mask ^ (drawn & inside)).sum())
        total += ann["area"]
    assert mismatch / total < 0.05


def test_boxes_and_polygons_match_the_drawn_pixels(tiny: Path) -> None:
    for split in SPLITS:
        inst = _load(tiny, "instances", split)
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in inst["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for img_meta in inst["images"]:
            anns = by_image[img_meta["id"]]
            assert TINY.min_objects <= len(anns) <= TINY.max_objects
            img = _pixels(tiny, split, img_meta["file_name"])
            boxes = []
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert all(isinstance(v, int) for v in ann["bbox"])
                assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= 32 and y + h <= 32
                colour = np.all(img == COLORS[ann["attributes"]["color"]], axis=-1)
                crop = colour[y : y + h, x : x + w]
                # Every pixel of the object is inside its box, and the box is tight on all four sides.
                assert crop.sum() == ann["area"] > 0
                assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
                poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
                assert len(ann["segmentation"]) == 1 and len(poly) >= 3
                # Drawn pixels are those whose centre lies inside the polygon.
                assert poly[:, 0].min() <= x + 0.5 and x + w - 0.5 <= poly[:, 0].max()
                assert poly[:, 1].min() <= y + 0.5 and y + h - 0.5 <= poly[:, 1].max()
                # ... but a sharp tip narrower than a pixel can pass between pixel centres: the triangle's apex
                # (1 px wide at 1 px from its tip) may reach up to 2 px beyond the centre of the last drawn row.
                assert poly[:, 0].min() > x - 1.5 and poly[:, 0].max() < x + w + 1.5
                assert poly[:, 1].min() > y - 1.5 and poly[:, 1].max() < y + h + 1.5
                boxes.append((x, y, w, h))
            for i, (ax, ay, aw, ah) in enumerate(boxes):
                for bx, by, bw, bh in boxes[i + 1 :]:
                    overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
                    assert not overlap, f"boxes overlap in image {img_meta['id']}"
            # Outside the boxes only background: no object colour appears there.
            outside = np.ones(img.shape[:2], dtype=bool)
            for x, y, w, h in boxes:
                outside[y : y + h, x : x + w] = False
            for rgb in COLORS.values():
                assert not np.all(img[outside] == rgb, axis=-1).any()


def test_captions(tiny: Path) -> None:
    vocabulary = set(shapes_vocabulary())
    assert 40 <= len(vocabulary) <= 60
    counts_seen = set()
    for split in SPLITS:
        caps, inst = _load(tiny, "captions", split), _load(tiny, "instances", split)
        captions: dict[int, list[str]] = {}
        for ann in caps["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        objects: dict[int, list[dict[str, Any]]] = {}
        for ann in inst["annotations"]:
            objects.setdefault(ann["image_id"], []).append(ann)
        for image_id, texts in captions.items():
            assert len(texts) == 5 and len(set(texts)) == 5
            for text in texts:
                assert text == text.strip().lower() and "  " not in text
                assert set(text.split()) <= vocabulary, text
            anns = sorted(objects[image_id], key=lambda a: a["bbox"][0] + a["bbox"][2] / 2)
            counts_seen.add(len(anns))
            phrases = [
                f"a {a['attributes']['size']} {a['attributes']['color']} {SHAPE_KINDS[a['category_id'] - 1]}"
                for a in anns
            ]
            canonical = texts[0]
            # Caption #0 names every object in left-to-right order, with one fixed template per count.
            positions = [canonical.index(p) for p in phrases]
            assert positions == sorted(positions), (canonical, phrases)
            if len(anns) == 1:
                assert canonical == phrases[0]
            elif len(anns) == 2:
                assert canonical == f"{phrases[0]} to the left of {phrases[1]}"
            else:
                assert canonical == f"three shapes from left to right {phrases[0]} {phrases[1]} and {phrases[2]}"
            for text in texts[1:]:
                assert all(p in text for p in phrases), text
    assert counts_seen == {1, 2, 3}


def test_caption_count_and_object_count_follow_the_config(tmp_path: Path) -> None:
    config = ShapesConfig(
        n_train=6, n_val=0, n_test=0, image_size=16, min_objects=3, max_objects=3, captions_per_image=9
    )
    generate_shapes(tmp_path / "d", config, progress=False)
    caps = _load(tmp_path / "d", "captions", "train")
    assert len(caps["annotations"]) == 6 * 9
    inst = _load(tmp_path / "d", "instances", "train")
    assert len(inst["annotations"]) == 6 * 3
    assert {a["attributes"]["size"] for a in inst["annotations"]} <= set(SIZES)
    for split in ("val", "test"):
        assert _load(tmp_path / "d", "captions", split)["images"] == []


def test_sizes_are_clearly_different(tiny: Path) -> None:
    inst = _load(tiny, "instances", "train")
    extent = {"small": [], "large": []}
    for ann in inst["annotations"]:
        extent[ann["attributes"]["size"]].append(max(ann["bbox"][2:]))
    assert extent["small"] and extent["large"]
    assert max(extent["small"]) * 1.4 < min(extent["large"])


def test_deterministic_byte_identical(tmp_path: Path, tiny: Path) -> None:
    generate_shapes(tmp_path / "again", TINY, progress=False)
    assert _digest(tmp_path / "again") == _digest(tiny)


def test_other_settings_in_place_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """A dataset made with other settings is never rewritten; the error names each one."""
    out = tmp_path / "d"
    generate_shapes(out, ShapesConfig(n_train=30, n_val=2, n_test=1, image_size=16, seed=9), progress=False)
    before = _digest(out)
    with pytest.raises(DataError) as caught:
        generate_shapes(out, TINY, progress=False)
    assert str(caught.value) == (
        f"{out} holds a shapes dataset made with n_train=30, n_val=2, n_test=1, image_size=16, seed=9; this run "
        "asks for n_train=20, n_val=8, n_test=8, image_size=32, seed=3: ask for n_train=30, n_val=2, n_test=1, "
        "image_size=16, seed=9 to use it, or choose another directory; an existing dataset is never rewritten"
    )
    assert _digest(out) == before
    # The same settings again: the dataset is used as it is, nothing is written.
    stamp = (out / "meta.json").stat().st_mtime_ns
    generate_shapes(out, ShapesConfig(n_train=30, n_val=2, n_test=1, image_size=16, seed=9), progress=False)
    assert _digest(out) == before and (out / "meta.json").stat().st_mtime_ns == stamp


def test_other_seed_gives_other_images(tmp_path: Path, tiny: Path) -> None:
    other = ShapesConfig(n_train=20, n_val=8, n_test=8, image_size=32, seed=4)
    generate_shapes(tmp_path / "other", other, progress=False)
    a, b = _digest(tiny), _digest(tmp_path / "other")
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in pngs) == len(pngs)


def test_val_and_test_do_not_depend_on_n_train(tmp_path: Path, tiny: Path) -> None:
    generate_shapes(
        tmp_path / "more", ShapesConfig(n_train=25, n_val=8, n_test=8, image_size=32, seed=3), progress=False
    )
    for split in ("val", "test"):
        old = sorted((tiny / "images" / split).iterdir())
        new = sorted((tmp_path / "more" / "images" / split).iterdir())
        assert [p.read_bytes() for p in old] == [p.read_bytes() for p in new]
        old_caps = [a["caption"] for a in _load(tiny, "captions", split)["annotations"]]
        assert old_caps == [a["caption"] for a in _load(tmp_path / "more", "captions", split)["annotations"]]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_train": 0}, r"ShapesConfig\.n_train must be >= 1, got 0"),
        ({"n_val": -1}, r"ShapesConfig\.n_val must be >= 0, got -1"),
        ({"n_test": -5}, r"ShapesConfig\.n_test must be >= 0, got -5"),
        ({"image_size": 8}, r"ShapesConfig\.image_size must be between 16 and 1024, got 8"),
        ({"image_size": 2048}, r"ShapesConfig\.image_size must be between 16 and 1024, got 2048"),
        ({"seed": -1}, r"ShapesConfig\.seed must be >= 0, got -1"),
        ({"min_objects": 0}, r"ShapesConfig\.min_objects must be between 1 and 3, got 0"),
        ({"max_objects": 4}, r"ShapesConfig\.max_objects must be between min_objects \(1\) and 3, got 4"),
        ({"min_objects": 3, "max_objects": 2}, r"ShapesConfig\.max_objects must be between min_objects \(3\) and 3"),
        ({"captions_per_image": 0}, r"ShapesConfig\.captions_per_image must be >= 1, got 0"),
        ({"image_size": 32.5}, r"ShapesConfig\.image_size must be an integer, got 32\.5"),
        ({"n_val": True}, r"ShapesConfig\.n_val must be an integer, got True"),
    ],
)
def test_config_validation(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(RobucapError, match=match):
        ShapesConfig(**changes)


def test_config_is_validated_again_before_generation(tmp_path: Path) -> None:
    config = ShapesConfig(n_train=2, n_val=0, n_test=0)
    config.image_size = 4
    with pytest.raises(RobucapError, match=r"image_size must be between 16 and 1024"):
        generate_shapes(tmp_path / "d", config, progress=False)
    assert not (tmp_path / "d").exists()


def test_refuses_to_overwrite_foreign_directories(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"not empty and is not a shapes dataset \(it contains notes\.txt\)"):
        generate_shapes(foreign, TINY, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1

    # A real shapes dataset with a user's file added next to it is not ours to delete either.
    mixed = tmp_path / "mixed"
    generate_shapes(mixed, ShapesConfig(n_train=1, n_val=0, n_test=0, image_size=16), progress=False)
    (mixed / "extra").mkdir()
    with pytest.raises(DataError, match=r"holds a shapes dataset made with n_train=1, n_val=0, n_test=0, image_"):
        generate_shapes(mixed, TINY, progress=False)
    assert (mixed / "extra").is_dir() and (mixed / "meta.json").is_file()

    lookalike = tmp_path / "lookalike"
    (lookalike / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"it has no shapes meta\.json"):
        generate_shapes(lookalike, TINY, progress=False)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"exists and is not a directory"):
        generate_shapes(a_file, TINY, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_shapes(empty, ShapesConfig(n_train=1, n_val=0, n_test=0, image_size=16), progress=False)


def test_shapes_ready(tmp_path: Path) -> None:
    out = tmp_path / "d"
    config = ShapesConfig(n_train=3, n_val=1, n_test=1, image_size=16)
    assert not shapes_ready(out, config)
    generate_shapes(out, config, progress=False)
    assert shapes_ready(out, config)
    assert shapes_ready(str(out), ShapesConfig(n_train=3, n_val=1, n_test=1, image_size=16))
    assert not shapes_ready(out, ShapesConfig(n_train=3, n_val=1, n_test=1, image_size=16, seed=1))
    assert not shapes_ready(out, ShapesConfig(n_train=3, n_val=1, n_test=1, image_size=16, captions_per_image=4))

    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    assert not shapes_ready(out, config), "an interrupted generation is not ready"
    (out / "meta.json").write_text("{not json")
    assert not shapes_ready(out, config)


def test_incomplete_or_old_datasets_are_refused_not_deleted(tmp_path: Path) -> None:
    """A partial or old-format shapes dataset is refused with advice; nothing is deleted."""
    out = tmp_path / "d"
    config = ShapesConfig(n_train=2, n_val=0, n_test=0, image_size=16)
    generate_shapes(out, config, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    before = _digest(out)
    with pytest.raises(DataError, match=r"d holds an incomplete shapes dataset .*: delete it to generate the data"):
        generate_shapes(out, config, progress=False)
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(DataError, match=r"d holds a shapes dataset of format 0, but this robucap writes format 1"):
        generate_shapes(out, config, progress=False)
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match=r"it has no shapes meta\.json; an older robucap leaves this"):
        generate_shapes(out, config, progress=False)
    assert {k: v for k, v in _digest(out).items() if k != "meta.json"} == {
        k: v for k, v in before.items() if k != "meta.json"
    }


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_shapes(tmp_path / "d", ShapesConfig(n_train=3, n_val=0, n_test=0, image_size=16), progress=True)
    assert "shapes dataset" in capsys.readouterr().err
    generate_shapes(tmp_path / "e", ShapesConfig(n_train=3, n_val=0, n_test=0, image_size=16), progress=False)
    assert capsys.readouterr().err == ""
