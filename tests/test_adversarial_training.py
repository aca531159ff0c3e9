"""AdversarialTraining: what each mode does to the batch, that it changes training, warm-up, static caching."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers.fake_datasets import tree_digest

from callbacks import AdversarialTraining
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from modules.captioning import CaptioningModule

EPSILON = 0.05


@pytest.fixture(scope="module")
def datamodule(shapes_root: Path) -> CaptionDataModule:
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=4, progress=False)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def batch(datamodule: CaptionDataModule) -> dict[str, Any]:
    return next(iter(datamodule.train_dataloader()))


@pytest.fixture(scope="module")
def module(datamodule: CaptionDataModule) -> CaptioningModule:
    L.seed_everything(0)
    return CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)


def _copy(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in batch.items()}


# Outside a Trainer, pl_module.log only warns; the logged value is checked in a real fit below.
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_adversarial_mode_replaces_images(module: CaptioningModule, batch: dict[str, Any]) -> None:
    b = _copy(batch)
    AdversarialTraining(mode="adversarial", epsilon=EPSILON).on_train_batch_start(
        SimpleNamespace(global_step=0), module, b, 0
    )
    clean, adversarial = batch["pixel_values"], b["pixel_values"]
    assert adversarial.shape == clean.shape
    assert not torch.equal(adversarial, clean)
    assert (adversarial - clean).abs().max() <= EPSILON + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert torch.equal(b["labels"], batch["labels"]) and b["image_id"] == batch["image_id"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_mixed_mode_doubles_the_batch(module: CaptioningModule, batch: dict[str, Any]) -> None:
    b = _copy(batch)
    size = batch["pixel_values"].shape[0]
    AdversarialTraining(mode="mixed", epsilon=EPSILON).on_train_batch_start(
        SimpleNamespace(global_step=0), module, b, 0
    )
    assert b["pixel_values"].shape[0] == 2 * size
    assert torch.equal(b["pixel_values"][:size], batch["pixel_values"])
    assert not torch.equal(b["pixel_values"][size:], batch["pixel_values"])
    assert (b["pixel_values"][size:] - batch["pixel_values"]).abs().max() <= EPSILON + 1e-6
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(b[key], torch.cat([batch[key], batch[key]]))
    assert b["image_id"] == batch["image_id"] * 2


def test_epsilon_warmup_is_linear() -> None:
    callback = AdversarialTraining(epsilon=0.04, epsilon_warmup_steps=10)
    assert [callback.current_epsilon(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.02, 0.04, 0.04])
    assert AdversarialTraining(epsilon=0.04).current_epsilon(0) == 0.04


def _fit(datamodule: CaptionDataModule, callbacks: list[L.Callback], **kwargs: Any) -> tuple[L.Trainer, Any]:
    L.seed_everything(0)
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32, warmup_steps=0)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module.captioner.state_dict()


def test_adversarial_training_differs_from_clean_training(datamodule: CaptionDataModule) -> None:
    _, clean = _fit(datamodule, [])
    _, clean_again = _fit(datamodule, [])
    trainer, adversarial = _fit(datamodule, [AdversarialTraining(mode="adversarial", epsilon=EPSILON)])
    assert all(torch.equal(clean[k], clean_again[k]) for k in clean)  # same seed, same run
    assert any(not torch.equal(clean[k], adversarial[k]) for k in clean)
    assert trainer.callback_metrics["train/adv_epsilon"] == pytest.approx(EPSILON)


class _Spy(L.Callback):
    """Records the images each training step sees (placed after AdversarialTraining)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append({"pixel_values": batch["pixel_values"].clone(), "image_id": list(batch["image_id"])})


def test_static_mode_caches_outside_the_dataset(
    datamodule: CaptionDataModule, shapes_root: Path, trained_checkpoint: Path, tmp_path: Path
) -> None:
    before = tree_digest(shapes_root)
    callback, spy = AdversarialTraining(mode="static", epsilon=EPSILON, checkpoint=str(trained_checkpoint)), _Spy()
    _fit(datamodule, [callback, spy], default_root_dir=str(tmp_path))
    assert tree_digest(shapes_root) == before  # nothing written into the dataset

    cache_dir = callback.cache_path
    assert cache_dir is not None and cache_dir.resolve().is_relative_to(tmp_path.resolve())
    cached = sorted(cache_dir.glob("*.pt"))
    assert len(cached) == len(datamodule.records["train"])  # one adversarial image per training image
    assert (cache_dir / "manifest.json").is_file()

    clean = {r.image_id: i for i, r in enumerate(datamodule.records["train"])}
    store = datamodule.datasets["train"].store
    for step in spy.batches:
        for image, image_id in zip(step["pixel_values"], step["image_id"], strict=True):
            original = store.image(clean[image_id])
            assert not torch.equal(image, original)
            assert (image - original).abs().max() <= EPSILON + 1e-3  # float16 storage

    # A second run with the same settings reuses the files (same fingerprint directory, nothing recomputed).
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    again = AdversarialTraining(mode="static", epsilon=EPSILON, checkpoint=str(trained_checkpoint))
    _fit(datamodule, [again], default_root_dir=str(tmp_path))
    assert again.cache_path == cache_dir and {p: p.stat().st_mtime_ns for p in cached} == mtimes

    # The same directory with another budget would silently train on the wrong examples.
    other = AdversarialTraining(
        mode="static", epsilon=0.1, checkpoint=str(trained_checkpoint), cache_dir=str(cache_dir)
    )
    with pytest.raises(RobucapError, match="holds adversarial images made with other settings"):
        _fit(datamodule, [other])


def test_static_cache_inside_the_dataset_is_refused(
    datamodule: CaptionDataModule, shapes_root: Path, trained_checkpoint: Path
) -> None:
    callback = AdversarialTraining(
        mode="static", checkpoint=str(trained_checkpoint), cache_dir=str(shapes_root / "adv_cache")
    )
    with pytest.raises(RobucapError, match="lies inside the dataset directory"):
        _fit(datamodule, [callback])
    assert not (shapes_root / "adv_cache").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "static"}, "static mode needs a checkpoint"),
        ({"mode": "static", "checkpoint": "x.ckpt", "epsilon_warmup_steps": 5}, "does not apply to static mode"),
        ({"epsilon": -0.01}, "epsilon must be in \\[0, 1\\]"),
        ({"epsilon": 1.5}, "epsilon must be in \\[0, 1\\]"),
        ({"mode": "both"}, "mode must be one of"),
        ({"attack": "deepfool"}, "unknown attack 'deepfool'"),
        ({"attack": "pgd", "attack_kwargs": {"stepz": 3}}, "has no option 'stepz'"),
        ({"epsilon_warmup_steps": -1}, "epsilon_warmup_steps must be >= 0"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        AdversarialTraining(**kwargs)
