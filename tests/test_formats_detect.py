"""`detect_format`: a dataset's format told from the files in its root, for commands given a bare directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.fake_datasets import write_coco, write_flickr8k, write_folder, write_karpathy

from datamodules.errors import DataError
from datamodules.formats import load_split
from datamodules.formats.detect import LOOKED_FOR, detect_format

WRITERS: dict[str, Callable[[Path], object]] = {
    "flickr8k in Flickr8k_text/": lambda root: write_flickr8k(root, 1),
    "flickr8k in the root": lambda root: write_flickr8k(root, 1, text_subdir=False, image_dir="Images"),
    "karpathy flickr8k": lambda root: write_karpathy(root, "flickr8k", 1),
    "karpathy coco": lambda root: write_karpathy(root, "coco", 1),
    "coco": lambda root: write_coco(root, 1),
    "folder": lambda root: write_folder(root, 1),
    "folder per split": lambda root: write_folder(root, 1, layout="per_split"),
}


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_detects_every_loader_layout(layout: str, tmp_path: Path) -> None:
    """Each format's own layout is recognised, and its loader reads the root as detected."""
    WRITERS[layout](tmp_path)
    fmt = detect_format(tmp_path)
    assert fmt == layout.split()[0]
    assert load_split(fmt, tmp_path, "test")  # the detected format is one its loader accepts


def test_generated_shapes_are_shapes_not_coco(tmp_path: Path) -> None:
    """The shapes generator's COCO files do not make its output ambiguous with coco."""
    from datamodules.shapes import ShapesConfig, generate_shapes

    generate_shapes(tmp_path, ShapesConfig(n_train=2, n_val=1, n_test=1, image_size=16, seed=0), progress=False)
    assert (tmp_path / "annotations" / "captions_test.json").is_file()
    assert detect_format(tmp_path) == "shapes"
    (tmp_path / "meta.json").write_text("{not json", encoding="utf-8")  # a broken meta.json is no shapes marker
    assert detect_format(tmp_path) == "coco"
    (tmp_path / "meta.json").write_text(json.dumps({"name": "other"}), encoding="utf-8")
    assert detect_format(tmp_path) == "coco"


def test_unknown_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    """A root of no known layout is one error naming the root and every file looked for."""
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\n", encoding="utf-8")  # without a split list
    with pytest.raises(DataError) as error:
        detect_format(tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot tell the dataset format of {tmp_path}")
    for fmt, files in LOOKED_FOR.items():
        assert f"{fmt}: {files}" in message
    assert "Flickr_8k.*Images.txt" in message and "annotations/captions_*.json" in message


def test_several_layouts_are_ambiguous(tmp_path: Path) -> None:
    """Native Flickr8k files next to Karpathy's file is an error, never a guess."""
    write_flickr8k(tmp_path, 1)
    write_karpathy(tmp_path, "flickr8k", 1)
    with pytest.raises(DataError, match="holds the files of several dataset formats") as error:
        detect_format(tmp_path)
    message = str(error.value)
    assert "flickr8k: Flickr8k_text/Flickr8k.token.txt" in message and "karpathy: dataset_flickr8k.json" in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^data directory {tmp_path / 'nowhere'} does not exist"):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "file")


def test_bare_data_root_of_the_checkpoint_commands_is_detected(tmp_path: Path) -> None:
    """``poison-scan`` / ``attack`` given only ``--data-root`` took any directory for shapes
    data (a Flickr8k root failed on COCO's missing ``captions_test.json``); its layout is now detected."""
    from lightning_app.inputs import data_options

    write_flickr8k(tmp_path / "f8k", 2)
    assert data_options(None, str(tmp_path / "f8k")) == {"format": "flickr8k", "root": str(tmp_path / "f8k"),
                                                         "tokenizer": None}  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset format of .*: it has none of the files looked for"):
        data_options(None, str(tmp_path / "empty"))
