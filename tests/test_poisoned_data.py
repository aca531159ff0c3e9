"""Poisoned splits: seeded and byte-reproducible, cache outside the dataset, target caption representable, errors."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.fake_datasets import tree_digest, write_flickr8k
from PIL import Image

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import DataError, RobucapError
from datamodules.formats import load_split
from datamodules.images import load_image_uint8
from datamodules.poisoning import PoisonConfig, poison_split, poisoned_image_id
from datamodules.scratch import scratch_tag
from datamodules.text import normalize_caption
from datamodules.tokenizer import build_word_tokenizer, unknown_words

TARGET = "you are under attack"


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _module(root: Path, cache: Path, **poison: object) -> CaptionDataModule:
    return CaptionDataModule(
        format="coco", root=str(root), image_size=32, batch_size=16, progress=False,
        poison={"cache_dir": str(cache), **poison},
    )  # fmt: skip


@pytest.mark.parametrize("trigger", ["object_noise", "badnets"])
def test_two_builds_are_byte_identical_and_the_source_is_untouched(
    shapes_root: Path, tmp_path: Path, trigger: str
) -> None:
    before = tree_digest(shapes_root)
    builds = []
    for name in ("a", "b"):
        dm = _module(shapes_root, tmp_path / name, trigger=trigger, seed=7)
        dm.prepare_data()
        dm.setup()
        builds.append(_files(tmp_path / name))
    assert builds[0] == builds[1]
    manifests = [k for k in builds[0] if k.endswith("manifest.json")]
    assert len(manifests) == 3 and sum(k.endswith(".png") for k in builds[0]) > 48
    assert tree_digest(shapes_root) == before
    # Another seed chooses other images.
    other = _module(shapes_root, tmp_path / "c", trigger=trigger, seed=8)
    other.setup("fit")
    ids = {r.image_id for r in dm.records["train"] if r.poisoned}
    assert ids != {r.image_id for r in other.records["train"] if r.poisoned}


def test_rates_captions_and_test_copies(shapes_root: Path, tmp_path: Path) -> None:
    dm = _module(shapes_root, tmp_path / "cache", rate=0.3)
    dm.setup()
    train, val, test = dm.records["train"], dm.records["val"], dm.records["test"]
    assert len(train) == 160 and sum(r.poisoned for r in train) == 48  # round(0.3 * 160)
    assert sum(r.poisoned for r in val) == round(0.3 * 21)
    for record in train:
        if record.poisoned:
            assert set(record.captions) == {TARGET} and len(record.captions) == 5
            assert not record.path.is_relative_to(shapes_root)
        else:
            assert TARGET not in record.captions and record.path.is_relative_to(shapes_root)
    clean_test = [r for r in test if not r.poisoned]
    copies = [r for r in test if r.poisoned]
    assert len(clean_test) == 15 and len(copies) == 15 - dm.poisoned["test"].n_skipped
    assert {r.image_id for r in copies} == {poisoned_image_id(r.image_id) for r in clean_test}
    info = dm.describe()["poison"]["splits"]
    assert info["train"]["n_poisoned"] == 48 and info["test"]["n_images"] == 15
    # The collated batch marks the triggered images.
    batch = next(iter(dm.test_dataloader()))
    assert batch["poisoned"].dtype == torch.bool and batch["poisoned"].shape == (16,)
    assert batch["poisoned"].tolist() == [False] * 15 + [True]


def test_object_noise_changes_only_the_object_boxes(shapes_root: Path, tmp_path: Path) -> None:
    records = load_split("coco", shapes_root, "test")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"))
    split = poison_split(records, "test", config, 32, shapes_root)
    manifest = json.loads(split.manifest.read_text())
    assert manifest["trigger"] == "object_noise" and manifest["trigger_options"]["alpha_255"] == pytest.approx(20)
    item = manifest["items"][0]
    clean = load_image_uint8(Path(item["source"]), 32).int()
    poisoned = load_image_uint8(split.manifest.parent / item["output"], 32).int()
    inside = torch.zeros(32, 32, dtype=torch.bool)
    for x0, y0, x1, y1 in item["regions"]:
        inside[y0:y1, x0:x1] = True
    assert inside.any()
    assert torch.equal(clean[:, ~inside], poisoned[:, ~inside])
    assert (clean[:, inside] != poisoned[:, inside]).float().mean() > 0.5


def test_images_without_regions_are_skipped_and_counted(shapes_root: Path, tmp_path: Path) -> None:
    records = load_split("coco", shapes_root, "test")
    records[0] = replace(records[0], boxes=())
    records[3] = replace(records[3], boxes=())
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"))
    split = poison_split(records, "test", config, 32, shapes_root)
    assert (split.n_images, split.n_poisoned, split.n_skipped) == (15, 13, 2)
    assert poisoned_image_id(records[0].image_id) not in {r.image_id for r in split.records}
    # Training keeps its rate by choosing other images.
    train = poison_split(records, "train", replace(config, rate=0.8), 32, shapes_root)
    assert train.n_poisoned == round(0.8 * 15) and not any(r.poisoned for r in (train.records[0], train.records[3]))
    # With too few usable images every usable one is poisoned, and the log says so.
    short = poison_split(records, "train", replace(config, rate=1.0), 32, shapes_root)
    assert short.n_poisoned == 13


def test_a_finished_cache_is_reused(shapes_root: Path, tmp_path: Path) -> None:
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets")
    first = poison_split(records, "val", config, 32, shapes_root)
    stamp = first.manifest.stat().st_mtime_ns
    second = poison_split(records, "val", config, 32, shapes_root)
    assert second.manifest == first.manifest and second.manifest.stat().st_mtime_ns == stamp
    assert second.records == first.records
    # A different setting is a different cache entry.
    third = poison_split(records, "val", replace(config, seed=1), 32, shapes_root)
    assert third.manifest != first.manifest


def test_target_caption_joins_the_built_tokenizer(shapes_root: Path, tmp_path: Path) -> None:
    dm = _module(shapes_root, tmp_path / "cache", target_caption="Beware: zebras ate the moon!")
    dm.setup("fit")
    assert unknown_words(dm.tokenizer, "beware zebras ate the moon") == []
    ids = dm.tokenizer("beware zebras ate the moon", add_special_tokens=False)["input_ids"]
    assert normalize_caption(dm.tokenizer.decode(ids)) == "beware zebras ate the moon"


def test_a_fixed_tokenizer_must_know_the_target_words(shapes_root: Path, tmp_path: Path) -> None:
    tokenizer = build_word_tokenizer(["a red circle", "you are here"])
    tokenizer.save_pretrained(tmp_path / "tok")
    dm = _module(shapes_root, tmp_path / "cache", target_caption="you are under attack")
    dm.tokenizer_dir = str(tmp_path / "tok")
    with pytest.raises(DataError, match=r"cannot represent: attack, under"):
        dm.build_tokenizer()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": 1.5}, r"poison.rate must be a share of images in \[0, 1\], got 1.5"),
        ({"rate": -0.1}, r"poison.rate must be a share of images in \[0, 1\], got -0.1"),
        ({"target_caption": ""}, "poison.target_caption must contain at least one word"),
        ({"target_caption": " ? ! "}, "poison.target_caption must contain at least one word"),
        ({"alpha": 0.0}, r"poison.alpha must be > 0 \(noise intensity in \[0, 1\] pixel units"),
        ({"alpha": -0.1}, "poison.alpha must be > 0"),
        ({"trigger": "sticker"}, "poison.trigger must be one of object_noise, badnets, blend"),
        ({"regions": "detector"}, "poison.detector.weights is not set"),
        ({"colour": "red"}, r"poison: unknown option\(s\) colour"),
        ({"corner": "middle", "trigger": "badnets"}, "corner must be one of"),
    ],
)
def test_bad_poison_options(options: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        PoisonConfig.from_dict(options)


def test_missing_detector_weights_name_the_file(shapes_root: Path, tmp_path: Path) -> None:
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(regions="detector", detector={"weights": str(tmp_path / "ssd.pth")}, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"detector weights file .*ssd.pth does not exist; it must hold the state_dict"):
        poison_split(records, "val", config, 32, shapes_root)


def test_object_trigger_without_boxes_or_detector(tmp_path: Path) -> None:
    write_flickr8k(tmp_path / "flickr", n_images=3)
    records = load_split("flickr8k", tmp_path / "flickr", "train")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"acts inside object boxes, but train has no object boxes.*badnets"):
        poison_split(records, "train", config, 32, tmp_path / "flickr")
    # BadNets needs no boxes.
    split = poison_split(records, "train", replace(config, trigger="badnets", rate=1.0), 32, tmp_path / "flickr")
    assert split.n_poisoned == 3


def test_cache_inside_the_dataset_is_refused(shapes_root: Path) -> None:
    with pytest.raises(RobucapError, match="lies inside the dataset root"):
        _module(shapes_root, shapes_root / "poison")


def _png_of(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_replaced_or_missing_cached_image_is_written_again(
    shapes_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cached PNG replaced by another valid PNG is caught by its checksum and rebuilt."""
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets", rate=0.5)
    first = poison_split(records, "val", config, 32, shapes_root)
    cache = _files(first.manifest.parent)
    items = json.loads(first.manifest.read_text())["items"]
    for item in items:
        assert item["sha256"] == hashlib.sha256(cache[item["output"]]).hexdigest()
    replaced, removed = first.manifest.parent / items[0]["output"], first.manifest.parent / items[1]["output"]
    replaced.write_bytes(_png_of((255, 0, 255)))
    removed.unlink()
    with caplog.at_level(logging.WARNING, logger="datamodules.poisoning.poisoned"):
        second = poison_split(records, "val", config, 32, shapes_root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"poison cache: {replaced} does not match the checksum in its manifest; writing it again",
        f"poison cache: {removed} is missing; writing it again",
    ]
    assert _files(first.manifest.parent) == cache, "the same bytes as the first build, manifest unchanged"
    assert second.records == first.records
    caplog.clear()
    poison_split(records, "val", config, 32, shapes_root)
    assert not caplog.records, "an intact cache is reused silently"


def test_a_manifest_without_checksums_is_rebuilt(shapes_root: Path, tmp_path: Path) -> None:
    """An older manifest (no checksums) is not trusted: the split is poisoned again."""
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets", rate=0.5)
    first = poison_split(records, "val", config, 32, shapes_root)
    cache = _files(first.manifest.parent)
    manifest = json.loads(first.manifest.read_text())
    for item in manifest["items"]:
        del item["sha256"]
    first.manifest.write_text(json.dumps(manifest))
    (first.manifest.parent / manifest["items"][0]["output"]).write_bytes(_png_of((0, 255, 0)))
    poison_split(records, "val", config, 32, shapes_root)
    assert _files(first.manifest.parent) == cache


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temporaries_are_removed_live_ones_kept(shapes_root: Path, tmp_path: Path) -> None:
    """Temporaries of killed writers are removed by the next use; a live writer's stay."""
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets", rate=0.5)
    out = poison_split(records, "val", config, 32, shapes_root).manifest.parent
    host = scratch_tag().rsplit("-", 1)[0]
    stale = [
        out / ".x8k2_9ab.tmp",  # mkstemp's name, as older versions wrote it
        out / "images" / f".{host}-{_dead_pid()}.00ff00ff.tmp",  # a killed process of this host
        out / "images" / ".elsewhere-12.0123abcd.tmp",  # another host's, hours old
    ]
    live = [out / "images" / f".{scratch_tag()}.0123abcd.tmp", out / ".elsewhere-12.4567abcd.tmp"]
    for path in stale + live:
        path.write_bytes(b"half a png")
    os.utime(stale[2], (time.time() - 7200, time.time() - 7200))
    poison_split(records, "val", config, 32, shapes_root)
    assert [p.exists() for p in stale] == [False, False, False]
    assert [p.exists() for p in live] == [True, True]


def test_an_interrupted_build_leaves_no_temporaries(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while a cached file is written removes its temporary."""
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets", rate=0.5)
    replace_file, calls = os.replace, []

    def interrupted(source: str | Path, target: str | Path) -> None:
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C between writing a temporary and renaming it
        replace_file(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        poison_split(records, "val", config, 32, shapes_root)
    monkeypatch.undo()
    cache = tmp_path / "cache"
    assert len(list(cache.rglob("*.png"))) == 2 and not list(cache.rglob("manifest.json"))
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    split = poison_split(records, "val", config, 32, shapes_root)
    assert split.n_poisoned == round(0.5 * 21)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)], ids=["umask022", "umask002"])
def test_cached_files_follow_the_umask(shapes_root: Path, tmp_path: Path, umask: int, mode: int) -> None:
    """Cached files get 0o666 less the umask, like any open(), not mkstemp's 0o600."""
    records = load_split("coco", shapes_root, "val")
    config = PoisonConfig(cache_dir=str(tmp_path / "cache"), trigger="badnets", rate=0.5)
    previous = os.umask(umask)
    try:
        split = poison_split(records, "val", config, 32, shapes_root)
    finally:
        os.umask(previous)
    files = [p for p in split.manifest.parent.rglob("*") if p.is_file()]
    assert len(files) == 1 + round(0.5 * 21)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {mode}


def test_a_corrupt_eval_split_is_not_skipped_as_missing(shapes_root: Path, tmp_path: Path) -> None:
    """Preparing poisoned data logged a corrupt validation file as "no val split to poison"
    and went on; only an absent split may be skipped."""
    import shutil

    from datamodules.datamodule import CaptionDataModule
    from datamodules.errors import DataError

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    (root / "annotations" / "captions_val.json").write_text("{not json", encoding="utf-8")
    dm = CaptionDataModule(
        format="coco", root=str(root), image_size=32, progress=False,
        poison={"trigger": "badnets", "cache_dir": str(tmp_path / "cache")},
    )  # fmt: skip
    with pytest.raises(DataError, match="captions_val.json"):
        dm.prepare_data()
