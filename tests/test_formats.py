"""Dataset format loaders on tiny datasets in the real formats, and their error messages."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.fake_datasets import (
    FakeDataset,
    tree_digest,
    write_coco,
    write_flickr8k,
    write_folder,
    write_image,
    write_karpathy,
)

from datamodules.errors import DataError, MissingSplitError
from datamodules.formats import FORMATS, SPLITS, assign_split, load_split
from datamodules.formats._common import RealPaths
from datamodules.images import load_image
from datamodules.records import ImageRecord

CASES: dict[str, tuple[str, Callable[[Path], FakeDataset]]] = {
    "coco": ("coco", write_coco),
    "shapes": ("shapes", write_coco),
    "karpathy-flickr8k": ("karpathy", lambda root: write_karpathy(root, "flickr8k")),
    "karpathy-flickr30k": ("karpathy", lambda root: write_karpathy(root, "flickr30k")),
    "karpathy-coco": ("karpathy", lambda root: write_karpathy(root, "coco", restval=2)),
    "flickr8k": ("flickr8k", write_flickr8k),
    "flickr8k-flat": ("flickr8k", lambda root: write_flickr8k(root, text_subdir=False, image_dir="Images")),
    "folder": ("folder", write_folder),
    "folder-per-split": ("folder", lambda root: write_folder(root, layout="per_split")),
    "folder-unsplit": ("folder", lambda root: write_folder(root, layout="unsplit")),
}


def _captions(records: list[ImageRecord]) -> dict[int | str, list[str]]:
    return {record.image_id: list(record.captions) for record in records}


@pytest.mark.parametrize("case", list(CASES))
def test_format_loads_every_split_with_all_references(tmp_path: Path, case: str) -> None:
    fmt, write = CASES[case]
    data = write(tmp_path)
    before = tree_digest(tmp_path)
    seen: set[int | str] = set()
    for split in SPLITS:
        records = load_split(fmt, tmp_path, split)
        assert _captions(records) == data.splits[split]
        assert [r.image_id for r in records] == sorted(data.splits[split])
        for record in records:
            assert record.path == data.paths[record.image_id].resolve()
            assert all(c == c.strip() and c for c in record.captions)
        seen.update(_captions(records))
    assert len(seen) == sum(len(images) for images in data.splits.values())  # splits are disjoint
    assert tree_digest(tmp_path) == before  # loading wrote nothing under the root


def test_loaded_images_are_rgb_squares(tmp_path: Path) -> None:
    write_coco(tmp_path, n_images=6)
    for record in load_split("coco", tmp_path, "train"):
        image = load_image(record.path, 20)
        assert image.shape == (3, 20, 20)
        assert 0.0 <= image.min().item() <= image.max().item() <= 1.0


# ---------------------------------------------------------------------------------------------------- coco


def test_coco_boxes_sizes_and_skipped_uncaptioned(tmp_path: Path) -> None:
    data = write_coco(tmp_path, n_images=4, uncaptioned=True)
    records = load_split("coco", tmp_path, "val")
    assert len(records) == 4  # the uncaptioned image is skipped
    for record in records:
        assert list(record.boxes) == data.boxes[record.image_id]
        assert (record.width, record.height) == data.sizes[record.image_id]
        assert isinstance(record.image_id, int)
    assert any(len(r.boxes) == 2 for r in records) and all(r.boxes[0].category for r in records)


def test_coco_without_instances_has_no_boxes_but_sizes(tmp_path: Path) -> None:
    data = write_coco(tmp_path, instances=False)
    records = load_split("coco", tmp_path, "train")
    assert all(r.boxes == () for r in records)
    assert all((r.width, r.height) == data.sizes[r.image_id] for r in records)


def test_coco_explicit_instances_file_must_exist(tmp_path: Path) -> None:
    write_coco(tmp_path, instances=False)
    expected = "the coco format expects the instances file given as instances_file='boxes/{split}.json' at "
    with pytest.raises(DataError, match=re.escape(expected + str(tmp_path / "boxes/train.json"))):
        load_split("coco", tmp_path, "train", instances_file="boxes/{split}.json")


def test_coco_real_layout_with_split_names(tmp_path: Path) -> None:
    names = {"train": "train2017", "val": "val2017", "test": "val2017"}
    data = write_coco(tmp_path, split_names=names, image_dir="{split}")
    options = {"split_names": names, "image_dir": "{split}"}
    train = load_split("coco", tmp_path, "train", **options)
    assert _captions(train) == data.splits["train"]
    assert train[0].path.parent.name == "train2017"
    val, test = (load_split("coco", tmp_path, s, **options) for s in ("val", "test"))
    assert _captions(val) == _captions(test) == data.splits["val"]
    assert len(val[0].boxes) >= 1


# ------------------------------------------------------------------------------------------------ karpathy


def test_karpathy_restval(tmp_path: Path) -> None:
    data = write_karpathy(tmp_path, "coco", restval=2)
    restval = data.extra["restval"]
    train = _captions(load_split("karpathy", tmp_path, "train"))
    assert set(restval) <= set(train)
    without = _captions(load_split("karpathy", tmp_path, "train", restval_to_train=False))
    assert set(without) == set(train) - set(restval)


def test_karpathy_explicit_file_and_image_dir(tmp_path: Path) -> None:
    data = write_karpathy(tmp_path, "flickr8k")
    write_karpathy(tmp_path / "other", "flickr30k")
    (tmp_path / "other" / "dataset_flickr30k.json").rename(tmp_path / "dataset_flickr30k.json")
    with pytest.raises(DataError, match=r"several Karpathy caption files \(dataset_flickr30k.json, dataset_flick"):
        load_split("karpathy", tmp_path, "val")
    records = load_split("karpathy", tmp_path, "val", file="dataset_flickr8k.json", image_dir="Flicker8k_Dataset")
    assert _captions(records) == data.splits["val"]


def test_karpathy_without_caption_file(tmp_path: Path) -> None:
    expected = r"the karpathy format expects a caption file dataset_\*\.json .* there is none"
    with pytest.raises(DataError, match=expected):
        load_split("karpathy", tmp_path, "train")


# ------------------------------------------------------------------------------------------------ flickr8k


def test_flickr8k_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"the flickr8k format expects the caption file Flickr8k\.token\.txt in "):
        load_split("flickr8k", tmp_path, "train")
    write_flickr8k(tmp_path)
    (tmp_path / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DataError, match=r"expects the val split list Flickr_8k\.devImages\.txt next to"):
        load_split("flickr8k", tmp_path, "val")


def test_flickr8k_malformed_token_line(tmp_path: Path) -> None:
    write_flickr8k(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "no tab on this line\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(token))} line 47: expected '<image file>#<n><TAB>"):
        load_split("flickr8k", tmp_path, "train")


def test_flickr8k_split_image_without_captions(tmp_path: Path) -> None:
    write_flickr8k(tmp_path)
    split_file = tmp_path / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    split_file.write_text(split_file.read_text() + "999_new.jpg\n")
    with pytest.raises(DataError, match=r"lists 1 images with no caption in .*; first: 999_new\.jpg"):
        load_split("flickr8k", tmp_path, "test")


# -------------------------------------------------------------------------------------------------- folder


def test_folder_hash_split_is_stable() -> None:
    assert assign_split("a/b.jpg") == assign_split("./a//b.jpg") == assign_split("a\\b.jpg")
    shares = [assign_split(f"img_{i}.jpg") for i in range(4000)]
    assert abs(shares.count("train") / 4000 - 0.90) < 0.02
    assert abs(shares.count("val") / 4000 - 0.05) < 0.015


def test_folder_mixed_split_fields(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "a.png", "caption": "x", "split": "train"}\n{"image": "a.png", "caption": "y"}\n'
    )
    with pytest.raises(DataError, match=r"line 2 has no 'split' field while line 1 has one"):
        load_split("folder", tmp_path, "train")


def test_folder_image_in_two_splits(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '{"image": "a.png", "caption": "x", "split": "train"}\n{"image": "a.png", "caption": "y", "split": "val"}\n'
    )
    expected = f"image 'a.png' is in both the train split ({path} line 1) and the val split ({path} line 2)"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("folder", tmp_path, "train")


def test_folder_both_layouts(tmp_path: Path) -> None:
    write_folder(tmp_path, layout="per_split")
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(DataError, match=r"found both .* keep only one of the two layouts"):
        load_split("folder", tmp_path, "train")


def test_folder_line_without_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl line 1: expected a 'caption' string or a 'captions' list"):
        load_split("folder", tmp_path, "train")


# --------------------------------------------------------------------------------------------- registry


def test_registry_and_unknown_format(tmp_path: Path) -> None:
    assert {"coco", "karpathy", "flickr8k", "folder", "shapes"} <= set(FORMATS)
    with pytest.raises(DataError, match=r"unknown dataset format 'voc'; expected one of coco, flickr8k, folder, karp"):
        load_split("voc", tmp_path, "train")


def test_unknown_split_and_option(tmp_path: Path) -> None:
    write_coco(tmp_path)
    with pytest.raises(DataError, match=r"unknown split 'dev' for the coco format; expected one of train, val, test"):
        load_split("coco", tmp_path, "dev")
    with pytest.raises(DataError, match=r"unknown option 'imagedir' for the coco dataset format; expected one of: "):
        load_split("coco", tmp_path, "train", imagedir="x")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset root .*nope for the folder format is not a directory"):
        load_split("folder", tmp_path / "nope", "train")


# ---------------------------------------------------------------------------------------------- bad input


def _coco_file(root: Path, split: str = "train") -> Path:
    return root / "annotations" / f"captions_{split}.json"


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_missing_images_are_counted(tmp_path: Path) -> None:
    data = write_flickr8k(tmp_path, n_images=3)
    names = sorted(data.splits["train"])
    for name in names[1:]:
        data.paths[name].unlink()
    split_file = tmp_path / "Flickr8k_text" / "Flickr_8k.trainImages.txt"
    expected = f"{split_file}: 2 of 3 images of split 'train' are missing; first missing: {data.paths[names[1]]}"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("flickr8k", tmp_path, "train")


def test_missing_image_coco(tmp_path: Path) -> None:
    data = write_coco(tmp_path)
    first = min(data.splits["test"])
    data.paths[first].unlink()
    expected = f"{_coco_file(tmp_path, 'test')}: 1 of 3 images of split 'test' are missing; first missing: "
    with pytest.raises(DataError, match=re.escape(expected + str(data.paths[first]))):
        load_split("coco", tmp_path, "test")


@pytest.mark.parametrize("fmt", ["coco", "flickr8k", "folder"])
def test_caption_file_not_utf8(tmp_path: Path, fmt: str) -> None:
    if fmt == "coco":
        write_coco(tmp_path)
        path = _coco_file(tmp_path)
    elif fmt == "flickr8k":
        write_flickr8k(tmp_path)
        path = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    else:
        write_folder(tmp_path)
        path = tmp_path / "captions.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:40] + "é".encode("latin-1") + data[40:])
    with pytest.raises(DataError, match=re.escape(f"{path} is not UTF-8 text: invalid byte 0xe9 at byte offset 40")):
        load_split(fmt, tmp_path, "train")


def test_caption_file_not_json(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = _coco_file(tmp_path)
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DataError, match=re.escape(f"{path} is not valid JSON: Expecting value at line 3, column 19")):
        load_split("coco", tmp_path, "train")


def test_karpathy_not_json(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(path.read_text()[:-1])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is not valid JSON: .* at line 1, column \d+"):
        load_split("karpathy", tmp_path, "train")


def test_caption_file_not_jsonl(tmp_path: Path) -> None:
    write_folder(tmp_path)
    path = tmp_path / "captions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"image": "x.png", "caption": "unterminated}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path} line 3 is not valid JSON: Unterminated string")):
        load_split("folder", tmp_path, "train")


def test_jsonl_line_not_object(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text('\n["a.png", "a cat"]\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: expected a JSON object, got list")):
        load_split("folder", tmp_path, "train")


def test_coco_wrong_structure(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = _coco_file(tmp_path)
    _edit_json(path, lambda v: v["images"][1].pop("file_name"))
    with pytest.raises(DataError, match=re.escape(f"{path}: images[1] has no 'file_name' field")):
        load_split("coco", tmp_path, "train")
    _edit_json(path, lambda v: v.update(images={}))
    with pytest.raises(DataError, match=re.escape(f"{path}: images must be a list, got dict")):
        load_split("coco", tmp_path, "train")


def test_coco_annotation_of_unknown_image(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = _coco_file(tmp_path)
    _edit_json(path, lambda v: v["annotations"].append({"image_id": 777, "id": 1, "caption": "x"}))
    with pytest.raises(DataError, match=r"annotations\[9\] refers to image_id 777, which is not in 'images'"):
        load_split("coco", tmp_path, "train")


def test_coco_bad_bbox(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_train.json"
    _edit_json(path, lambda v: v["annotations"][0].update(bbox=[1, 2, 3]))
    with pytest.raises(DataError, match=r"annotations\[0\]\.bbox must be four numbers \[x, y, width, height\]"):
        load_split("coco", tmp_path, "train")


def test_empty_caption_coco(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = _coco_file(tmp_path)
    _edit_json(path, lambda v: v["annotations"][4].update(caption="  \n"))
    image_id = json.loads(path.read_text())["annotations"][4]["image_id"]
    expected = f"{path}: caption annotations[4] of image {image_id} is empty; every caption must contain text"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("coco", tmp_path, "train")


def test_empty_caption_karpathy(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "flickr30k")
    path = tmp_path / "dataset_flickr30k.json"
    _edit_json(path, lambda v: v["images"][1]["sentences"][2].update(raw=" "))
    name = json.loads(path.read_text())["images"][1]["filename"]
    expected = f"{path}: caption images[1].sentences[2] of image '{name}' is empty"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("karpathy", tmp_path, "train")


def test_empty_caption_flickr8k(tmp_path: Path) -> None:
    data = write_flickr8k(tmp_path)
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    name = lines[1].split("#")[0]
    lines[1] = f"{name}#1\t   "
    token.write_text("\n".join(lines) + "\n")
    assert name in data.splits["train"]
    expected = f"{token}: caption #1 (line 2) of image '{name}' is empty"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("flickr8k", tmp_path, "train")


def test_empty_caption_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.png", "captions": ["a cat", ""]}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: caption 1 on line 1 of image 'a.png' is empty")):
        load_split("folder", tmp_path, "train")


def test_escaping_path_coco(tmp_path: Path) -> None:
    write_coco(tmp_path)
    write_image(tmp_path / "outside.png", 0)
    path = _coco_file(tmp_path)
    _edit_json(path, lambda v: v["images"][0].update(file_name="../../outside.png"))
    with pytest.raises(DataError, match=re.escape(f"{path}: image path '../../outside.png' resolves to ")):
        load_split("coco", tmp_path, "train")


@pytest.mark.parametrize("image", ["../secret.png", "/etc/hostname"])
def test_escaping_path_folder(tmp_path: Path, image: str) -> None:
    root = tmp_path / "data"
    write_image(tmp_path / "secret.png", 0)
    path = root / "captions.jsonl"
    root.mkdir()
    path.write_text(json.dumps({"image": image, "caption": "x", "split": "train"}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: image path .* outside the image root"):
        load_split("folder", root, "train")


def test_escaping_path_flickr8k(tmp_path: Path) -> None:
    write_flickr8k(tmp_path / "data")
    write_image(tmp_path / "x.jpg", 0)
    text = tmp_path / "data" / "Flickr8k_text"
    (text / "Flickr_8k.trainImages.txt").write_text("../../x.jpg\n")
    token = text / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "../../x.jpg#0\ta stolen image\n")
    with pytest.raises(DataError, match=r"Flickr_8k\.trainImages\.txt: image path '\.\./\.\./x\.jpg' .* outside"):
        load_split("flickr8k", tmp_path / "data", "train")


def test_missing_required_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"the coco format expects the train captions file at .*captions_train\.json"):
        load_split("coco", tmp_path, "train")
    with pytest.raises(DataError, match=r"the folder format expects .*captions\.jsonl .* but there is no such file"):
        load_split("folder", tmp_path, "val")


def test_missing_image_folders(tmp_path: Path) -> None:
    write_coco(tmp_path)
    expected = "the coco format expects the train images in the folder "
    with pytest.raises(DataError, match=re.escape(expected + str(tmp_path / "pictures" / "train"))):
        load_split("coco", tmp_path, "train", image_dir="pictures/{split}")
    write_flickr8k(tmp_path / "f8", image_dir="somewhere_else")
    with pytest.raises(DataError, match=r"trainImages\.txt: cannot find image '.*\.jpg' in any of Flicker8k_Dataset, "):
        load_split("flickr8k", tmp_path / "f8", "train")
    assert load_split("flickr8k", tmp_path / "f8", "train", image_dir="somewhere_else")
    write_karpathy(tmp_path / "k", "flickr8k")
    with pytest.raises(DataError, match=r"the karpathy format expects the images given as image_dir in the folder"):
        load_split("karpathy", tmp_path / "k", "train", image_dir="nope")


def test_top_level_not_an_object(tmp_path: Path) -> None:
    write_karpathy(tmp_path)
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=re.escape(f"{path}: the top-level JSON value must be an object, got list")):
        load_split("karpathy", tmp_path, "train")
    path.write_text("{}")
    with pytest.raises(DataError, match=re.escape(f"{path}: the top-level object has no 'images' field")):
        load_split("karpathy", tmp_path, "train")


def test_split_with_no_images(tmp_path: Path) -> None:
    write_coco(tmp_path)
    path = _coco_file(tmp_path, "val")
    _edit_json(path, lambda v: v.update(annotations=[]))
    with pytest.raises(DataError, match=re.escape(f"{path}: split 'val' has no images (coco format)")):
        load_split("coco", tmp_path, "val")


def test_folder_split_with_no_images(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    empty = next(s for s in SPLITS if s != assign_split("a.png"))
    with pytest.raises(DataError, match=rf"split '{empty}' has no images \(folder format\).*by a hash of their path"):
        load_split("folder", tmp_path, empty)


# ------------------------------------------------------------------------- every loader, the same rules

PUNCTUATION = "...!"  # "!!!" would be a word: the PTB tokenizer keeps it, pycocoevalcap drops only "!"


def _punctuation_caption(fmt: str, root: Path) -> str:
    """Make one caption of a train image punctuation only; return the start of the message a loader must give."""
    tail = f" is {json.dumps(PUNCTUATION)}, which is empty once normalised (lower-cased, punctuation removed)"
    if fmt in ("coco", "shapes"):
        write_coco(root)
        path = _coco_file(root)
        _edit_json(path, lambda v: v["annotations"][4].update(caption=PUNCTUATION))
        image_id = json.loads(path.read_text())["annotations"][4]["image_id"]
        return f"{path}: caption annotations[4] of image {image_id}{tail}"
    if fmt == "karpathy":
        write_karpathy(root, "flickr30k")
        path = root / "dataset_flickr30k.json"
        _edit_json(path, lambda v: v["images"][1]["sentences"][2].update(raw=PUNCTUATION))
        name = json.loads(path.read_text())["images"][1]["filename"]
        return f"{path}: caption images[1].sentences[2] of image '{name}'{tail}"
    if fmt == "flickr8k":
        write_flickr8k(root)
        token = root / "Flickr8k_text" / "Flickr8k.token.txt"
        lines = token.read_text().splitlines()
        name = lines[1].split("#")[0]
        lines[1] = f"{name}#1\t{PUNCTUATION} "
        token.write_text("\n".join(lines) + "\n")
        return f"{token}: caption #1 (line 2) of image '{name}'{tail}"
    write_folder(root)
    path = root / "captions.jsonl"
    lines = path.read_text().splitlines()
    third = json.loads(lines[2])
    third["captions"][1] = PUNCTUATION
    lines[2] = json.dumps(third)
    path.write_text("\n".join(lines) + "\n")
    return f"{path}: caption 1 on line 3 of image '{third['image']}'{tail}"


@pytest.mark.parametrize("fmt", ["coco", "shapes", "karpathy", "flickr8k", "folder"])
def test_caption_without_words(tmp_path: Path, fmt: str) -> None:
    """A caption empty after normalisation (``...!``) is rejected by every format loader.

    The message names the caption file, the image and the caption's position (line or field).
    """
    expected = _punctuation_caption(fmt, tmp_path)
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split(fmt, tmp_path, "train")


def _leak_message(image: str, first: tuple[str, str], second: tuple[str, str], same_as: str = "") -> str:
    """The message for an image in two splits; ``first`` and ``second`` are (split, where it is listed)."""
    also = f" (the same file as {same_as!r})" if same_as else ""
    leak = " (training on evaluation images inflates their scores)" if "train" in (first[0], second[0]) else ""
    return (
        f"image {image!r}{also} is in both the {first[0]} split ({first[1]}) and the {second[0]} split "
        f"({second[1]}); list each image in one split only{leak}"
    )


def test_flickr8k_image_in_two_split_lists(tmp_path: Path) -> None:
    """Flickr8k rejects an image that the train and the test list both name, in every split."""
    write_flickr8k(tmp_path)
    text = tmp_path / "Flickr8k_text"
    train_list, test_list = text / "Flickr_8k.trainImages.txt", text / "Flickr_8k.testImages.txt"
    leaked = train_list.read_text().splitlines()[1]
    test_list.write_text(test_list.read_text() + leaked + "\n")
    expected = _leak_message(leaked, ("train", f"{train_list} line 2"), ("test", f"{test_list} line 4"))
    for split in SPLITS:
        with pytest.raises(DataError) as error:
            load_split("flickr8k", tmp_path, split)
        assert str(error.value) == expected


def test_karpathy_image_in_two_splits(tmp_path: Path) -> None:
    """Karpathy rejects two entries of different splits naming one image file."""
    write_karpathy(tmp_path, "flickr30k")
    path = tmp_path / "dataset_flickr30k.json"
    name = json.loads(path.read_text())["images"][1]["filename"]
    _edit_json(path, lambda v: v["images"][4].update(filename=name))  # images[4] is a val entry
    expected = _leak_message(name, ("train", f"{path} images[1]"), ("val", f"{path} images[4]"))
    for split in ("train", "val"):
        with pytest.raises(DataError) as error:
            load_split("karpathy", tmp_path, split)
        assert str(error.value) == expected


def test_karpathy_restval_image_also_in_test(tmp_path: Path) -> None:
    """A restval entry naming a test image leaks it into train unless restval stays out."""
    write_karpathy(tmp_path, "coco", restval=1)
    path = tmp_path / "dataset_coco.json"
    test_entry = json.loads(path.read_text())["images"][7]
    _edit_json(path, lambda v: v["images"][9].update(filename=test_entry["filename"], filepath=test_entry["filepath"]))
    image = f"{test_entry['filepath']}/{test_entry['filename']}"
    expected = _leak_message(image, ("test", f"{path} images[7]"), ("train", f"{path} images[9] (split 'restval')"))
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("karpathy", tmp_path, "test")
    # Kept out of train, restval belongs to no split: nothing leaks.
    assert len(load_split("karpathy", tmp_path, "test", restval_to_train=False)) == 3


def test_coco_image_in_two_caption_files(tmp_path: Path) -> None:
    """COCO rejects an image file listed with captions by two splits' caption files."""
    write_coco(tmp_path, image_dir="images")  # one image folder for every split
    train, test = _coco_file(tmp_path, "train"), _coco_file(tmp_path, "test")
    file_name = json.loads(train.read_text())["images"][0]["file_name"]

    def leak(value: dict) -> None:
        value["images"].append({"id": 999, "file_name": file_name, "width": 9, "height": 9})
        value["annotations"].append({"id": 99900, "image_id": 999, "caption": "a leaked image"})

    _edit_json(test, leak)
    expected = _leak_message(file_name, ("train", f"{train} (image id 1)"), ("test", f"{test} (image id 999)"))
    for split in SPLITS:
        with pytest.raises(DataError) as error:
            load_split("coco", tmp_path, split, image_dir="images")
        assert str(error.value) == expected


def test_coco_uncaptioned_image_in_two_files_is_no_leak(tmp_path: Path) -> None:
    """An image listed without captions is not part of its split, so listing it in two files is allowed."""
    data = write_coco(tmp_path, image_dir="images")
    train = json.loads(_coco_file(tmp_path, "train").read_text())
    uncaptioned = next(i for i in train["images"] if i["id"] not in data.splits["train"])
    _edit_json(_coco_file(tmp_path, "test"), lambda v: v["images"].append(dict(uncaptioned, id=999)))
    assert _captions(load_split("coco", tmp_path, "train", image_dir="images")) == data.splits["train"]


def test_coco_train_sharing_a_caption_file(tmp_path: Path) -> None:
    """Split_names that make train and test read one caption file are rejected.

    Val and test sharing a file stays allowed (the documented setup for real COCO, which has no test captions).
    """
    write_coco(tmp_path)
    expected = (
        f"the coco format reads the train and the test split from the same file {_coco_file(tmp_path)}, so training "
        "would see the test images; give train its own captions file (check split_names and captions_file)"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("coco", tmp_path, "val", split_names={"test": "train"})
    assert load_split("coco", tmp_path, "test", split_names={"test": "val"})


def test_folder_split_folder_linked_to_another(tmp_path: Path) -> None:
    """A per-split folder that is a link to another split's folder leaks its images."""
    write_folder(tmp_path, layout="per_split")
    shutil.rmtree(tmp_path / "test")
    (tmp_path / "test").symlink_to("train", target_is_directory=True)
    first = ("train", f"{tmp_path / 'train' / 'captions.jsonl'} line 1")
    expected = _leak_message("train_0/pic 0.png", first, ("test", f"{tmp_path / 'test' / 'captions.jsonl'} line 1"))
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("folder", tmp_path, "test")


def test_folder_symlink_hashed_into_another_split(tmp_path: Path) -> None:
    """A file under two names (a symlink) is one image, whatever split each name hashes to."""
    write_image(tmp_path / "a.png", 0)
    link = next(f"link_{k}.png" for k in range(100) if assign_split(f"link_{k}.png") != assign_split("a.png"))
    (tmp_path / link).symlink_to("a.png")
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.png", "caption": "a cat"}\n' + json.dumps({"image": link, "caption": "a cat"}) + "\n")
    expected = _leak_message(
        link, (assign_split("a.png"), f"{path} line 1"), (assign_split(link), f"{path} line 2"), same_as="a.png"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        load_split("folder", tmp_path, "train")


@pytest.mark.parametrize("case", ["coco", "karpathy-coco", "flickr8k", "folder", "folder-per-split"])
def test_overlap_check_does_not_open_other_splits_images(tmp_path: Path, case: str) -> None:
    """The cross-split check reads the other splits' caption files only: their images may even be unreadable."""
    fmt, write = CASES[case]
    data = write(tmp_path)
    for split in ("val", "test"):
        for image_id in data.splits[split]:
            data.paths[image_id].write_bytes(b"not an image")
    assert _captions(load_split(fmt, tmp_path, "train")) == data.splits["train"]


# ----------------------------------------------------------------------------------------- missing splits


def _drop_train(case: str, root: Path) -> None:
    """Remove the train split of a dataset written by ``CASES[case]``, as the format would lack it."""
    if case in ("coco", "shapes"):
        _coco_file(root, "train").unlink()
    elif case.startswith("karpathy"):
        (path,) = root.glob("dataset_*.json")
        _edit_json(path, lambda v: v.update(images=[i for i in v["images"] if i["split"] not in ("train", "restval")]))
    elif case.startswith("flickr8k"):
        (path,) = root.rglob("Flickr_8k.trainImages.txt")
        path.unlink()
    elif case == "folder-per-split":
        (root / "train" / "captions.jsonl").unlink()
    else:
        path = root / "captions.jsonl"
        objects = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [o for o in objects if o.get("split", assign_split(o["image"].removeprefix("./"))) != "train"]
        path.write_text("".join(json.dumps(o) + "\n" for o in kept))


@pytest.mark.parametrize("case", list(CASES))
def test_missing_split_has_its_own_error(tmp_path: Path, case: str) -> None:
    """A split the data lacks raises MissingSplitError, which callers can tell apart.

    Other data errors stay plain DataErrors (see test_datamodule.py for what the tokenizer makes of each).
    """
    fmt, write = CASES[case]
    write(tmp_path)
    _drop_train(case, tmp_path)
    with pytest.raises(MissingSplitError):
        load_split(fmt, tmp_path, "train")
    assert load_split(fmt, tmp_path, "val")  # the other splits still load


def test_other_data_errors_are_not_missing_splits(tmp_path: Path) -> None:
    """A missing root, a corrupt caption file or a missing image is not a missing split (see finding 8's tests)."""
    missing_image = write_coco(tmp_path / "image")
    missing_image.paths[min(missing_image.splits["train"])].unlink()
    write_coco(tmp_path / "json")
    _coco_file(tmp_path / "json").write_text("{")
    for root, message in [
        (tmp_path / "nope", "is not a directory"),
        (tmp_path / "image", "1 of 3 images of split 'train' are missing"),
        (tmp_path / "json", "is not valid JSON"),
    ]:
        with pytest.raises(DataError, match=message) as error:
            load_split("coco", root, "train")
        assert not isinstance(error.value, MissingSplitError)


def test_real_paths_match_os_realpath(tmp_path: Path) -> None:
    """The cross-split check's path resolver agrees with os.path.realpath on links, dot segments and absent files."""
    write_image(tmp_path / "images" / "a.png", 0)
    (tmp_path / "images" / "link.png").symlink_to("a.png")
    (tmp_path / "alias").symlink_to("images", target_is_directory=True)
    (tmp_path / "images" / "sub").mkdir()
    resolve = RealPaths()
    for root, relative in [
        (tmp_path / "images", "a.png"),
        (tmp_path / "images", "link.png"),
        (tmp_path / "alias", "link.png"),
        (tmp_path / "alias", "./sub/../a.png"),
        (tmp_path / "images", "sub/.."),
        (tmp_path / "missing", "x.png"),
        (tmp_path / "images", "../alias/a.png"),
    ]:
        assert resolve(root, relative) == os.path.realpath(os.path.join(root, relative)), relative
