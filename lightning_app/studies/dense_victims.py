"""The dense study's victims: two detectors, two segmenters and a captioner, trained here or loaded by role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.instances import InstancesDataModule
from lightning_app.dense_training import train_victim
from lightning_app.studies.dense_settings import DenseStudyConfig
from lightning_app.training import train_captioner
from modules.captioning import CaptioningModule
from modules.dense import DenseVictimModule, read_victim
from modules.detection import DetectionModule
from modules.segmentation import SegmentationModule

__all__ = ["DenseVictims", "instances_module", "prepare_victims"]


@dataclass
class DenseVictims:
    """The study's five victims and how each came to be.

    Attributes:
        detectors: ``detector`` and (``transfer_victims``) ``detector_2``.
        segmenters: ``segmenter`` and (``transfer_victims``) ``segmenter_2``.
        captioner: The captioner.
        info: Per role: architecture, seed, checkpoint, training seconds, test metrics (plain JSON).
    """

    detectors: dict[str, DetectionModule]
    segmenters: dict[str, SegmentationModule]
    captioner: CaptioningModule
    info: dict[str, dict[str, Any]]


def instances_module(data: dict[str, Any], cfg: DenseStudyConfig) -> InstancesDataModule:
    # The captions' data module generates shapes at the captioner's side; the instances describe that same dataset.
    shapes = {"image_size": data["image_size"], **(data.get("shapes") or {})}
    datamodule = InstancesDataModule(
        format=data["format"] if data["format"] in ("shapes", "coco") else "coco", root=data["root"],
        image_size=cfg.victim_image_size, batch_size=cfg.batch_size, eval_batch_size=cfg.attack_batch_size,
        limit_train=cfg.train_images, limit_val=cfg.val_images, limit_test=cfg.test_images,
        shapes=shapes, progress=False,
    )  # fmt: skip
    datamodule.prepare_data()
    return datamodule


def _load_dense(role: str, path: str, kind: type[DenseVictimModule], image_size: int) -> DenseVictimModule:
    if not Path(path).is_file():
        raise RobucapError(f"--study.checkpoints.{role}: {path} does not exist")
    info = read_victim(path)
    if info is None or info.victim != kind.victim:
        held = info.victim if info is not None else "no dense victim (a captioner's checkpoint?)"
        raise RobucapError(f"--study.checkpoints.{role}: {path} holds {held}, expected a {kind.victim}")
    module = kind.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    if int(module.hparams.image_size) != image_size:
        raise RobucapError(
            f"--study.checkpoints.{role}: {path} takes {module.hparams.image_size} px images, the study's victims "
            f"{image_size} px (set --study.victim_image_size)"
        )
    return module


def _dense_victim(
    role: str, kind: type[DenseVictimModule], arch: str, seed: int, epochs: int,
    datamodule: InstancesDataModule, out: Path, cfg: DenseStudyConfig,
) -> tuple[DenseVictimModule, dict[str, Any]]:  # fmt: skip
    path = cfg.checkpoints.get(role)
    if path is not None:
        module = _load_dense(role, path, kind, cfg.victim_image_size)
        return module, {"arch": module.hparams.arch, "seed": None, "checkpoint": path}
    L.seed_everything(seed, workers=True)
    print(f"[dense study] {role}: {epochs} epochs of {kind.victim} {arch} (seed {seed})")
    module = kind(arch=arch, num_classes=len(datamodule.categories) + 1, image_size=cfg.victim_image_size)
    run = train_victim(datamodule, module, out, role, epochs, wandb=cfg.wandb)
    info = {"arch": arch, "seed": seed, "checkpoint": str(run.checkpoint), "train_seconds": round(run.train_seconds, 1)}
    return run.module, {**info, "test": run.test}


def _captioner(captions: CaptionDataModule, out: Path, cfg: DenseStudyConfig) -> tuple[CaptioningModule, dict]:
    path = cfg.checkpoints.get("captioner")
    if path is not None:
        from lightning_app.export import load_module

        dense = read_victim(path)
        if dense is not None:
            raise RobucapError(f"--study.checkpoints.captioner: {path} holds a {dense.victim}")
        module = load_module(path).eval()
        return module, {"arch": module.architecture, "seed": None, "checkpoint": path}
    L.seed_everything(cfg.seed, workers=True)
    print(f"[dense study] captioner: {cfg.captioner_epochs} epochs of vit_gpt2/tiny (seed {cfg.seed})")
    module = CaptioningModule.with_tokenizer(
        captions.tokenizer, captioner={"class_path": "vit_gpt2", "init_args": {"preset": "tiny"}},
        image_size=captions.image_size,
    )  # fmt: skip
    run = train_captioner(captions, module, out, "captioner", cfg.captioner_epochs, wandb=cfg.wandb)
    info = {"arch": "vit_gpt2", "seed": cfg.seed, "checkpoint": str(run.checkpoint)}
    return run.module.eval(), {**info, "train_seconds": round(run.train_seconds, 1), "test": run.test}


def prepare_victims(
    instances: InstancesDataModule, captions: CaptionDataModule, out: Path, cfg: DenseStudyConfig,
    captioner: CaptioningModule | None = None,
) -> DenseVictims:  # fmt: skip
    """Train (or load) the five victims.

    Args:
        instances: The instances data at the victims' side.
        captions: The captions of the same images at the captioner's side.
        out: Run directory (logs, checkpoints).
        cfg: Settings.
        captioner: A trained captioner to use as is (the demo passes its baseline).
    """
    specs = {
        "detector": (DetectionModule, cfg.detector_arch, cfg.seed, cfg.detector_epochs),
        "detector_2": (DetectionModule, cfg.detector_arch, cfg.seed + 1, cfg.detector_epochs),
        "segmenter": (SegmentationModule, cfg.segmenter_arch, cfg.seed, cfg.segmenter_epochs),
        "segmenter_2": (SegmentationModule, cfg.other_segmenter_arch, cfg.seed, cfg.segmenter_epochs),
    }
    if not cfg.transfer_victims:
        del specs["detector_2"], specs["segmenter_2"]
    modules, info = {}, {}
    for role, (kind, arch, seed, epochs) in specs.items():
        modules[role], info[role] = _dense_victim(role, kind, arch, seed, epochs, instances, out, cfg)
    if captioner is None:
        captioner, info["captioner"] = _captioner(captions, out, cfg)
    else:
        info["captioner"] = {"arch": captioner.architecture, "seed": None, "checkpoint": "given"}
    return DenseVictims(
        {r: modules[r] for r in ("detector", "detector_2") if r in modules},  # type: ignore[misc]
        {r: modules[r] for r in ("segmenter", "segmenter_2") if r in modules},  # type: ignore[misc]
        captioner.eval(),
        info,
    )
