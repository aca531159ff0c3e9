"""``robucap study dense``: Dense Adversary Generation (Xie et al. 2017) on detectors, segmenters and a captioner.

Five victims train on the same shapes data (or come from ``--study.checkpoints``, by role):

* ``detector`` (the source; small Faster R-CNN, seed ``seed``) and ``detector_2`` (the same architecture, seed
  ``seed + 1``: another training run);
* ``segmenter`` (the source; small preset, seed ``seed``) and ``segmenter_2`` (``other_segmenter_arch``, a
  torchvision builder, random init: another architecture);
* ``captioner`` (tiny ViT-GPT2 on the captions of the same images, at the data's caption size).

On the first ``images`` test images with a ground-truth object, the study measures

1. **Table 1** for both sources (:mod:`modules.dense_victims_eval`): clean / DAG / permuted-control score,
   iterations, perceptibility ``p``;
2. **transfer** (Tables 3-5, :func:`modules.dense_transfer.transfer_row`): each source's ``r`` on the other training
   run, the other architecture and the other task, each with its permuted control;
3. the **summed perturbation** ``r_det + r_seg`` on the held-out models (``detector_2``, ``segmenter_2``) and on the
   sources, with its permuted control (the paper's section 4.3);
4. **into captioning** (:func:`modules.dense_transfer.caption_shift`): the captioner on ``x + r_det``, ``x + r_seg``
   and ``x + r_det + r_seg`` (resized to its input side) next to Gaussian noise of the same L2 norm;
5. **DAG on the captioner** itself (:func:`modules.dense_eval.attack_tokens`, content words pushed to another word
   of their class) with FGSM at the same L-infinity norm.

Attacks and scoring live in :mod:`modules`; this file trains or loads, calls and gathers; the report is
:mod:`lightning_app.studies.dense_report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.instances import IGNORE_INDEX, InstanceBatch, InstancesDataModule
from lightning_app.dense_training import train_victim
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.studies.dense_report import report_dense_study, summary
from lightning_app.training import train_captioner
from modules.attacks.dag import DAG, PAPER_GAMMA
from modules.captioning import CaptioningModule
from modules.dense import DenseVictimModule, read_victim
from modules.dense_eval import NoTargetError, TokenDagEvaluation, attack_tokens
from modules.dense_transfer import (
    CaptionShift,
    TransferRow,
    caption_shift,
    resize_images,
    summed_perturbation,
    transfer_row,
)
from modules.dense_victims_eval import (
    DenseDagEvaluation,
    Scorer,
    attack_detector,
    attack_segmenter,
    detection_truth,
    detector_scorer,
    segmenter_scorer,
)
from modules.detection import DETECTOR_ARCHITECTURES, DetectionModule
from modules.segmentation import SEGMENTER_ARCHITECTURES, SegmentationModule

__all__ = ["ROLES", "STUDY", "DenseOutcome", "DenseStudyConfig", "DenseVictims", "run_dense_study"]

ROLES = ("detector", "detector_2", "segmenter", "segmenter_2", "captioner")
"""The victims of the study, by role (``--study.checkpoints`` keys)."""


@dataclass
class DenseStudyConfig:
    """Settings of the dense study."""

    victim_image_size: int = 128
    """Input side of the detectors and segmenters, in pixels (the shapes' 64 px images are upsampled)."""
    train_images: int | None = None
    """Training images of every victim (the first N; ``None``: all)."""
    val_images: int | None = 500
    """Validation images for model selection (the first N)."""
    test_images: int | None = 1000
    """Test images each trained victim is scored on (the first N)."""
    images: int = 16
    """Test images attacked: the first N with a ground-truth object."""
    detector_epochs: int = 2
    """Training epochs of each detector."""
    segmenter_epochs: int = 2
    """Training epochs of each segmenter."""
    captioner_epochs: int = 3
    """Training epochs of the captioner."""
    batch_size: int = 16
    """Training batch size of the detectors and segmenters (the captioner: 64)."""
    detector_arch: str = "small"
    """Architecture of both detectors (:data:`~modules.detection.DETECTOR_ARCHITECTURES`)."""
    segmenter_arch: str = "small"
    """Architecture of the source segmenter."""
    other_segmenter_arch: str = "lraspp_mobilenet_v3_large"
    """Architecture of ``segmenter_2`` (transfer across architectures; a torchvision builder, random init)."""
    gamma: float = PAPER_GAMMA
    """DAG's step in [0, 1] pixel units (the paper's 0.5 / 255)."""
    detector_iterations: int = 150
    """DAG's ``M_0`` on the detector (the paper: 150)."""
    segmenter_iterations: int = 200
    """DAG's ``M_0`` on the segmenter (the paper: 200)."""
    captioner_iterations: int = 200
    """DAG's ``M_0`` on the captioner's content words."""
    captioner_dag: bool = True
    """Also run DAG on the captioner itself (``dense.captioner``)."""
    attack_batch_size: int = 16
    """Images attacked (and scored) at once."""
    seed: int = 0
    """Seed of the sources (``detector_2`` trains with ``seed + 1``), the class permutations and the controls."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Existing checkpoints to use instead of training, by role (``detector``, ``detector_2``, ``segmenter``,
    ``segmenter_2``, ``captioner``); roles left out are trained."""
    wandb: bool = True
    """Log every training run to W&B (offline without an API key)."""

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobucapError(f"--study.{name} must be >= 1 or null, got {value}")
        epochs = ("detector_epochs", "segmenter_epochs", "captioner_epochs")
        iterations = ("detector_iterations", "segmenter_iterations", "captioner_iterations")
        for name in ("images", "batch_size", "attack_batch_size", *epochs, *iterations):
            if getattr(self, name) < 1:
                raise RobucapError(f"--study.{name} must be >= 1, got {getattr(self, name)}")
        if not self.gamma > 0:
            raise RobucapError(f"--study.gamma (DAG's step, [0, 1] pixel units) must be > 0, got {self.gamma}")
        if self.victim_image_size < 16:
            raise RobucapError(f"--study.victim_image_size must be >= 16 pixels, got {self.victim_image_size}")
        if self.detector_arch not in DETECTOR_ARCHITECTURES:
            raise RobucapError(
                f"--study.detector_arch must be one of {', '.join(DETECTOR_ARCHITECTURES)}, got {self.detector_arch!r}"
            )
        for name in ("segmenter_arch", "other_segmenter_arch"):
            if getattr(self, name) not in SEGMENTER_ARCHITECTURES:
                raise RobucapError(
                    f"--study.{name} must be one of {', '.join(SEGMENTER_ARCHITECTURES)}, got {getattr(self, name)!r}"
                )
        unknown = sorted(set(self.checkpoints) - set(ROLES))
        if unknown:
            raise RobucapError(f"--study.checkpoints has unknown roles {unknown}; expected some of {', '.join(ROLES)}")


@dataclass
class DenseVictims:
    """The study's five victims and how each came to be.

    Attributes:
        detectors: ``detector`` and ``detector_2``.
        segmenters: ``segmenter`` and ``segmenter_2``.
        captioner: The captioner.
        info: Per role: architecture, seed, checkpoint, training seconds, test metrics (plain JSON).
    """

    detectors: dict[str, DetectionModule]
    segmenters: dict[str, SegmentationModule]
    captioner: CaptioningModule
    info: dict[str, dict[str, Any]]


@dataclass
class DenseOutcome:
    """A finished dense study: its results.json entries and what the report draws from.

    Attributes:
        results: ``dataset``, ``dense`` (``detector``, ``segmenter``, ``captioner``, ``transfer``,
            ``into_captioning``, ``victims``, ``image_ids``), ``config``, ``seconds``.
        detector: Table 1 on the source detector.
        segmenter: Table 1 on the source segmenter.
        captioner: DAG on the captioner, or ``None`` when not run.
        transfer: The transfer rows.
        into_captioning: The caption shifts.
        categories: Category names (label ``i + 1`` is ``categories[i]``).
    """

    results: dict[str, Any]
    detector: DenseDagEvaluation
    segmenter: DenseDagEvaluation
    captioner: TokenDagEvaluation | None
    transfer: list[TransferRow]
    into_captioning: list[CaptionShift]
    categories: tuple[str, ...]


# -- victims --------------------------------------------------------------------------------------------------------
def _instances(data: dict[str, Any], cfg: DenseStudyConfig) -> InstancesDataModule:
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
    info = read_victim(path)
    if not Path(path).is_file():
        raise RobucapError(f"--study.checkpoints.{role}: {path} does not exist")
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

        if read_victim(path) is not None:
            raise RobucapError(f"--study.checkpoints.captioner: {path} holds a {read_victim(path).victim}")
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
    modules, info = {}, {}
    for role, (kind, arch, seed, epochs) in specs.items():
        modules[role], info[role] = _dense_victim(role, kind, arch, seed, epochs, instances, out, cfg)
    if captioner is None:
        captioner, info["captioner"] = _captioner(captions, out, cfg)
    else:
        info["captioner"] = {"arch": captioner.architecture, "seed": None, "checkpoint": "given"}
    return DenseVictims(
        {r: modules[r] for r in ("detector", "detector_2")},  # type: ignore[misc]
        {r: modules[r] for r in ("segmenter", "segmenter_2")},  # type: ignore[misc]
        captioner.eval(),
        info,
    )


# -- attacked images ------------------------------------------------------------------------------------------------
def attacked_batches(instances: InstancesDataModule, images: int) -> list[InstanceBatch]:
    """The first ``images`` test images with a (non-crowd) object and a foreground pixel, in test-split order.

    Raises:
        RobucapError: Fewer such images in the test split than asked for (none: no test split).
    """
    kept: list[InstanceBatch] = []
    count = 0
    for batch in instances.test_dataloader():
        keep = [
            i for i in range(len(batch))
            if len(batch.boxes[i]) > 0 and bool((batch.masks[i].ne(0) & batch.masks[i].ne(IGNORE_INDEX)).any())
        ][: images - count]  # fmt: skip
        if keep:
            kept.append(batch.select(keep))
            count += len(keep)
        if count == images:
            return kept
    raise RobucapError(
        f"the test split has {count} images with an object, fewer than --study.images {images}; lower it or raise "
        "--study.test_images"
    )


def _references(captions: CaptionDataModule, ids: list[Any]) -> list[list[str]]:
    by_id = {record.image_id: list(record.captions) for record in captions.load_records("test")}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RobucapError(
            f"test images {missing[:5]} have instances but no captions in {captions.root}: the captions and the "
            "instances files must describe the same images"
        )
    return [by_id[i] for i in ids]


# -- the study ------------------------------------------------------------------------------------------------------
def _transfer(
    victims: DenseVictims, batches: list[InstanceBatch], det: DenseDagEvaluation, seg: DenseDagEvaluation, seed: int,
    batch_size: int,
) -> list[TransferRow]:  # fmt: skip
    truth = [detection_truth(b, i) for b in batches for i in range(len(b))]
    masks = torch.cat([b.masks for b in batches])
    scorers: dict[str, tuple[Scorer, str]] = {
        name: (detector_scorer(m, truth, batch_size), "map50") for name, m in victims.detectors.items()
    }
    scorers.update({name: (segmenter_scorer(m, masks, batch_size), "miou") for name, m in victims.segmenters.items()})
    clean = det.clean_images
    r_det, r_seg = det.adversarial_images - clean, seg.adversarial_images - clean
    r_sum = summed_perturbation(clean, r_det, r_seg)
    plan = [
        ("detector", r_det, "detector", "white-box"), ("detector", r_det, "detector_2", "training run"),
        ("detector", r_det, "segmenter", "task"), ("detector", r_det, "segmenter_2", "task"),
        ("segmenter", r_seg, "segmenter", "white-box"), ("segmenter", r_seg, "segmenter_2", "architecture"),
        ("segmenter", r_seg, "detector", "task"), ("segmenter", r_seg, "detector_2", "task"),
        *(("detector+segmenter", r_sum, target, "summed") for target in scorers),
    ]  # fmt: skip
    rows = []
    for source, r, target, relation in plan:
        score, metric = scorers[target]
        rows.append(transfer_row(source, target, relation, clean, r, score, metric, seed))
    return rows


def run_dense_study(
    data: dict[str, Any], out: Path, cfg: DenseStudyConfig, captioner: CaptioningModule | None = None
) -> DenseOutcome:
    """Train (or load) the victims, run DAG on the sources and measure every transfer.

    Args:
        data: ``format``, ``root``, ``image_size`` (the captioner's) and ``shapes`` of the data.
        out: Directory for logs and checkpoints.
        cfg: Settings.
        captioner: A trained captioner to study instead of training one.
    """
    start = time.perf_counter()
    out = Path(out)
    captions = CaptionDataModule(**data, limit_train=cfg.train_images, limit_val=cfg.val_images, progress=False)
    captions.prepare_data()
    instances = _instances(data, cfg)
    victims = prepare_victims(instances, captions, out, cfg, captioner)
    batches = attacked_batches(instances, cfg.images)
    ids = [i for b in batches for i in b.image_ids]
    references = _references(captions, ids)
    print(f"[dense study] DAG on the detector and the segmenter, {len(ids)} images")
    det_attack = DAG(gamma=cfg.gamma, max_iterations=cfg.detector_iterations)
    seg_attack = DAG(gamma=cfg.gamma, max_iterations=cfg.segmenter_iterations)
    det = attack_detector(victims.detectors["detector"], batches, det_attack, cfg.seed, cfg.attack_batch_size)
    seg = attack_segmenter(victims.segmenters["segmenter"], batches, seg_attack, cfg.seed, cfg.attack_batch_size)
    assert det is not None and seg is not None  # every kept image has an object and a foreground pixel
    transfer = _transfer(victims, batches, det, seg, cfg.seed, cfg.attack_batch_size)
    clean = det.clean_images
    r_det, r_seg = det.adversarial_images - clean, seg.adversarial_images - clean
    shifts = [
        caption_shift(victims.captioner, name, clean, r, references, ids, cfg.seed, cfg.attack_batch_size)
        for name, r in (("detector", r_det), ("segmenter", r_seg),
                        ("detector+segmenter", summed_perturbation(clean, r_det, r_seg)))
    ]  # fmt: skip
    tokens, not_run = None, None
    if cfg.captioner_dag:
        print("[dense study] DAG on the captioner's content words")
        small = resize_images(clean, int(victims.captioner.hparams.image_size))
        try:
            tokens = attack_tokens(
                victims.captioner, small, references, ids,
                DAG(gamma=cfg.gamma, max_iterations=cfg.captioner_iterations), cfg.seed, cfg.attack_batch_size,
            )  # fmt: skip
        except NoTargetError as error:  # an outcome of this captioner on these images, recorded as such
            not_run = str(error)
    results = _results(cfg, victims, det, seg, tokens, transfer, shifts, ids, captions, start)
    if not_run is not None:
        results["dense"]["captioner_not_run"] = not_run
    return DenseOutcome(results, det, seg, tokens, transfer, shifts, instances.categories)


def _results(
    cfg: DenseStudyConfig, victims: DenseVictims, det: DenseDagEvaluation, seg: DenseDagEvaluation,
    tokens: TokenDagEvaluation | None, transfer: list[TransferRow], shifts: list[CaptionShift], ids: list[Any],
    captions: CaptionDataModule, start: float,
) -> dict[str, Any]:  # fmt: skip
    attack = {"gamma": cfg.gamma, "gamma_255": cfg.gamma * 255}
    dense: dict[str, Any] = {
        "victims": victims.info,
        "image_ids": ids,
        "detector": {**attack, "max_iterations": cfg.detector_iterations, **det.scores()},
        "segmenter": {**attack, "max_iterations": cfg.segmenter_iterations, **seg.scores()},
        "transfer": [row.to_json() for row in transfer],
        "into_captioning": [shift.to_json() for shift in shifts],
    }
    results: dict[str, Any] = {"dataset": captions.describe(), "dense": dense}
    if tokens is not None:
        dense["captioner"] = {**attack, "max_iterations": cfg.captioner_iterations, **tokens.scores()}
    results["config"] = asdict(cfg)
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def run_and_report(
    data: dict[str, Any], out: Path, cfg: DenseStudyConfig, report: Report, captioner: CaptioningModule | None = None
) -> dict[str, Any]:
    """Run the study, add it to ``report`` and return its results entries (the demo's dense stage)."""
    outcome = run_dense_study(data, out, cfg, captioner)
    STUDY.report(outcome, report)
    return outcome.results


class DenseStudy(Study[DenseStudyConfig, DenseOutcome]):
    """``robucap study dense``."""

    name = "dense"
    help = "DAG (Xie et al. 2017): Table 1 on a detector and a segmenter, transfer, summed r, into captioning."
    settings_type = DenseStudyConfig

    def run(self, settings: DenseStudyConfig, data: StudyData, out: Path) -> DenseOutcome:
        """Train (or load) the victims, attack and measure every transfer."""
        return run_dense_study(data.module_options(), out, settings)

    def report(self, outcome: DenseOutcome, report: Report) -> None:
        """Table 1, the transfer tables, into captioning and the Fig. 1 examples."""
        report_dense_study(report, outcome)

    def results(self, outcome: DenseOutcome) -> dict[str, Any]:
        """``dataset``, ``dense``, ``config`` and ``seconds``."""
        return outcome.results

    def summary(self, results: dict[str, Any]) -> str:
        """Table 1's headline figures."""
        return summary(results)


STUDY = DenseStudy()
