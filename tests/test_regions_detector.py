"""The object-oriented backdoor's regions from robucap's own detector checkpoint (``poison.detector.checkpoint``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.errors import DataError, RobucapError
from datamodules.formats import load_split
from datamodules.images import load_image, load_image_uint8
from datamodules.instances import InstancesDataModule
from datamodules.poisoning import PoisonConfig, poison_split, regions
from datamodules.poisoning.regions import DetectorRegions, build_region_source
from datamodules.records import Box
from lightning_app.cli import main
from modules.dense import VICTIM_KEY
from modules.detection import DetectionModule

DETECTOR_SIZE = 64  # the detector sees the 32 px fixture upsampled, as the shapes detector sees 64 px at 128


@pytest.fixture(scope="module")
def detector_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small detector trained for a few steps on the shapes fixture, saved by Lightning as ``robucap fit`` does."""
    L.seed_everything(0, verbose=False)
    module = DetectionModule(arch="small", num_classes=6, image_size=DETECTOR_SIZE, lr=4e-3, warmup_steps=0)
    data = InstancesDataModule(format="coco", root=str(shapes_root), image_size=DETECTOR_SIZE, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    path = tmp_path_factory.mktemp("detector") / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def threshold(shapes_root: Path, detector_checkpoint: Path) -> float:
    """A score cut that keeps about one box per test image (a few steps of training leave scores near 1/6)."""
    module = DetectionModule.load_from_checkpoint(detector_checkpoint, map_location="cpu", weights_only=True)
    records = load_split("coco", shapes_root, "test")
    found = module.detect(torch.stack([load_image(record.path, DETECTOR_SIZE) for record in records]))
    scores = sorted({s for f in found for s in f["scores"].tolist()}, reverse=True)
    assert len(scores) > len(records)
    # Half-way between two distinct scores, so no box sits on the cut.
    return (scores[len(records) - 1] + scores[len(records)]) / 2


def _expected(checkpoint: Path, path: Path, source_size: int, threshold: float) -> tuple[Box, ...]:
    """``DetectionModule.detect`` on the resized image, above the threshold, best first, in source pixels."""
    module = DetectionModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    found = module.detect(load_image(path, DETECTOR_SIZE)[None])[0]
    scale = source_size / DETECTOR_SIZE
    rows = sorted(
        zip(found["scores"].tolist(), found["boxes"].tolist(), found["labels"].tolist(), strict=True),
        key=lambda row: -row[0],
    )
    return tuple(
        Box(x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale, str(label))
        for score, (x0, y0, x1, y1), label in rows
        if score >= threshold and x1 > x0 and y1 > y0
    )


def test_regions_are_the_detectors_boxes_above_the_threshold(
    shapes_root: Path, detector_checkpoint: Path, threshold: float, tmp_path: Path
) -> None:
    records = load_split("coco", shapes_root, "test")
    source = build_region_source(
        "detector", checkpoint=str(detector_checkpoint), score_threshold=threshold, cache_dir=tmp_path / "cache"
    )
    assert isinstance(source, DetectorRegions) and source.input_size == DETECTOR_SIZE
    found = [source.regions(record) for record in records]
    assert sum(map(len, found)) > 0
    for record, boxes in zip(records, found, strict=True):
        expected = _expected(detector_checkpoint, record.path, 32, threshold)
        assert len(boxes) == len(expected)
        for box, want in zip(boxes, expected, strict=True):
            assert box.category == want.category
            assert (box.x, box.y, box.w, box.h) == pytest.approx((want.x, want.y, want.w, want.h), abs=1e-4)
    # A second source reads the cache (no detection) and gets the same boxes.
    again = DetectorRegions(checkpoint=detector_checkpoint, score_threshold=threshold, cache_dir=tmp_path / "cache")
    again.model = None  # type: ignore[assignment]  # detection would fail: every box comes from the cache
    assert [again.regions(record) for record in records] == found


def test_the_cache_key_is_the_checkpoints_content(detector_checkpoint: Path, threshold: float, tmp_path: Path) -> None:
    def cache(path: Path) -> Path:
        return DetectorRegions(checkpoint=path, score_threshold=threshold, cache_dir=tmp_path).cache_dir

    copy = tmp_path / "elsewhere.ckpt"
    shutil.copy(detector_checkpoint, copy)
    assert cache(copy) == cache(detector_checkpoint)
    # Same path, other weights (a retrained detector): another cache.
    state = torch.load(copy, map_location="cpu", weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 1
    torch.save(state, copy)
    assert cache(copy) != cache(detector_checkpoint)


def test_object_noise_lands_inside_the_detectors_boxes(
    shapes_root: Path, detector_checkpoint: Path, threshold: float, tmp_path: Path
) -> None:
    records = load_split("coco", shapes_root, "test")
    config = PoisonConfig.from_dict(
        {
            "regions": "detector",
            "detector": {"checkpoint": str(detector_checkpoint), "score_threshold": threshold},
            "cache_dir": str(tmp_path / "poison"),
        }
    )
    split = poison_split(records, "test", config, 32, shapes_root)
    items = json.loads(split.manifest.read_text())["items"]
    assert items
    by_path = {str(record.path): record for record in records}
    for item in items:
        clean = load_image_uint8(Path(item["source"]), 32).int()
        poisoned = load_image_uint8(split.manifest.parent / item["output"], 32).int()
        boxes = _expected(detector_checkpoint, by_path[item["source"]].path, 32, threshold)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        assert 0 < len(item["regions"]) <= len(boxes)
        for x0, y0, x1, y1 in item["regions"]:
            # Each trigger region is one of the detector's boxes (rounded to pixels).
            assert any(abs(x0 - b.x) <= 1 and abs(y0 - b.y) <= 1 and abs(x1 - b.x - b.w) <= 1 for b in boxes)
            inside[y0:y1, x0:x1] = True
        assert inside.any() and not inside.all()
        assert torch.equal(clean[:, ~inside], poisoned[:, ~inside])
        assert (clean[:, inside] != poisoned[:, inside]).any()


def _marked(path: Path, victim: str | None) -> Path:
    checkpoint: dict[str, object] = {"state_dict": {}, "hyper_parameters": {"lr": 1.0}}
    if victim is not None:
        checkpoint[VICTIM_KEY] = {"victim": victim, "class_path": f"modules.{victim}.Module"}
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("victim", "message"),
    [
        ("segmenter", r"holds a segmenter checkpoint; expected a detector checkpoint"),
        (None, r"holds no detector \(a captioner's\?\) checkpoint"),
    ],
)
def test_a_checkpoint_of_another_victim_is_refused(tmp_path: Path, victim: str | None, message: str) -> None:
    path = _marked(tmp_path / "other.ckpt", victim)
    with pytest.raises(DataError, match=rf"^poison\.detector\.checkpoint .*other\.ckpt {message}"):
        DetectorRegions(checkpoint=path, cache_dir=tmp_path)


def test_bad_checkpoint_options(detector_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"poison\.detector\.checkpoint .*gone\.ckpt does not exist"):
        DetectorRegions(checkpoint=tmp_path / "gone.ckpt", cache_dir=tmp_path)
    with pytest.raises(RobucapError, match=r"'checkpoint' records the detector's architecture.*remove arch, weights"):
        PoisonConfig(regions="detector", detector={"checkpoint": "a.ckpt", "arch": "small", "weights": "b.pth"})
    # A Lightning checkpoint given as torchvision weights says where it belongs.
    with pytest.raises(DataError, match=r"is a Lightning checkpoint, not a state_dict; .*poison\.detector\.checkpoint"):
        DetectorRegions(weights=detector_checkpoint, cache_dir=tmp_path, num_classes=6)


def test_the_cli_refuses_a_segmenter_checkpoint_in_one_line(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    segmenter = _marked(tmp_path / "segmenter.ckpt", "segmenter")
    detector = json.dumps({"checkpoint": str(segmenter)})
    argv = ["fit", "--config", "configs/experiment/shapes_backdoor.yaml", "--data.root", str(shapes_root)]
    argv += ["--data.format", "coco", "--data.image_size", "32", "--data.progress", "false"]
    argv += ["--data.poison.regions", "detector", "--data.poison.detector", detector]
    argv += ["--data.poison.cache_dir", str(tmp_path / "poison"), "--trainer.default_root_dir", str(tmp_path / "run")]
    argv += ["--trainer.logger", "false", "--trainer.max_steps", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("robucap: error: poison.detector.checkpoint") and "holds a segmenter" in error


def test_without_the_detector_module_a_checkpoint_is_a_wiring_error(
    detector_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(regions, "_checkpoint_loaders", {})
    with pytest.raises(RuntimeError, match=r"import modules\.detection before building the data"):
        DetectorRegions(checkpoint=detector_checkpoint, cache_dir=tmp_path)


def test_the_robucap_commands_register_the_checkpoint_reader() -> None:
    # A fresh interpreter: what the fit / validate / test / predict commands import is enough.
    code = (
        "import lightning_app.lightning_cli\n"
        "from datamodules.poisoning import regions\n"
        "assert 'detector' in regions._checkpoint_loaders\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_robucap_fit_trains_a_backdoored_captioner_on_the_detectors_regions(
    shapes_root: Path, detector_checkpoint: Path, threshold: float, tmp_path: Path
) -> None:
    # The box cache goes under tmp_path too: a test never writes into the repository.
    detector = json.dumps(
        {"checkpoint": str(detector_checkpoint), "score_threshold": threshold, "cache_dir": str(tmp_path / "regions")}
    )
    argv = ["fit", "--config", "configs/experiment/shapes_backdoor.yaml", "--data.root", str(shapes_root)]
    argv += ["--data.format", "coco", "--data.image_size", "32", "--data.progress", "false", "--data.limit_val", "8"]
    argv += ["--data.poison.regions", "detector", "--data.poison.detector", detector]
    argv += ["--data.poison.cache_dir", str(tmp_path / "poison"), "--trainer.default_root_dir", str(tmp_path / "run")]
    argv += ["--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"]
    argv += ["--trainer.enable_progress_bar", "false"]
    assert main(argv) == 0
    manifests = [json.loads(path.read_text()) for path in (tmp_path / "poison").rglob("manifest.json")]
    items = [item for manifest in manifests for item in manifest["items"]]
    # Every poisoned image's trigger regions came from the detector (images it found nothing in are skipped).
    assert items and all(item["regions"] for item in items)
    assert next((tmp_path / "run").rglob("*.ckpt")).is_file()
