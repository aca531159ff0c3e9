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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.instances import IGNORE_INDEX, InstanceBatch, InstancesDataModule
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.studies.dense_report import report_dense_study, summary
from lightning_app.studies.dense_settings import ROLES, DenseStudyConfig
from lightning_app.studies.dense_victims import DenseVictims, instances_module, prepare_victims
from modules.attacks.dag import DAG
from modules.captioning import CaptioningModule
from modules.captions import caption_images
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

__all__ = ["ROLES", "STUDY", "DenseOutcome", "DenseStudyConfig", "DenseVictims", "run_dense_study"]


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
        if target not in scorers:  # the second training run and architecture are optional (transfer_victims)
            continue
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
    instances = instances_module(data, cfg)
    victims = prepare_victims(instances, captions, out, cfg, captioner)
    batches = attacked_batches(instances, cfg.images)
    ids = [i for b in batches for i in b.image_ids]
    references = _references(captions, ids)
    print(f"[dense study] DAG on the detector and the segmenter, {len(ids)} images")
    det_attack = DAG(gamma=cfg.gamma, max_iterations=cfg.detector_iterations)
    seg_attack = DAG(gamma=cfg.gamma, max_iterations=cfg.segmenter_iterations)
    det = attack_detector(
        victims.detectors["detector"], batches, det_attack, cfg.seed, cfg.attack_batch_size,
        reselect_every=cfg.detector_reselect_every,
    )  # fmt: skip
    seg = attack_segmenter(victims.segmenters["segmenter"], batches, seg_attack, cfg.seed, cfg.attack_batch_size)
    assert det is not None and seg is not None  # every kept image has an object and a foreground pixel
    transfer = _transfer(victims, batches, det, seg, cfg.seed, cfg.attack_batch_size)
    clean = det.clean_images
    r_det, r_seg = det.adversarial_images - clean, seg.adversarial_images - clean
    # The clean captions are the same for every perturbation: made once.
    small = resize_images(clean, int(victims.captioner.hparams.image_size))
    clean_captions = caption_images(victims.captioner, small, cfg.attack_batch_size, num_beams=1)
    shifts = [
        caption_shift(
            victims.captioner, name, clean, r, references, ids, cfg.seed, cfg.attack_batch_size, clean_captions
        )
        for name, r in (("detector", r_det), ("segmenter", r_seg),
                        ("detector+segmenter", summed_perturbation(clean, r_det, r_seg)))
    ]  # fmt: skip
    tokens, not_run = None, None
    if cfg.captioner_dag:
        print("[dense study] DAG on the captioner's content words")
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
        "detector": {
            **attack,
            "max_iterations": cfg.detector_iterations,
            "reselect_every": cfg.detector_reselect_every,
            **det.scores(),
        },  # fmt: skip
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
