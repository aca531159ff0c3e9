"""``robucap study transfer``: transferability of adversarial images between captioners.

Following Liu et al. 2017 and Show-and-Fool (Chen et al. 2018).

Five captioners train on the same data (or come from ``--checkpoints``, at least three), as Liu et al.'s (2017) five
ImageNet models: ``vit_gpt2_s0`` and ``vit_gpt2_s1`` (tiny ViT-GPT2, seeds 0 and 1: same architecture, different
weights), ``vit_gpt2_wide_s2`` (a wider ViT-GPT2: another size), ``sat_s0`` and ``sat_s1`` (tiny Show-Attend-Tell,
seeds 0 and 1: another architecture); ``--study.models`` chooses others. On the first ``images`` test images:

1. **Single-model transfer** (Liu et al. 2017, Tables 1-2; Show-and-Fool, section 4.4). Per source model, a targeted
   Show-and-Fool caption attack (targets: Show-and-Fool's choice, the source's caption of another image), the
   targeted optimisation attack of the ensembles on the source alone (same targets and budget: the single-model
   baseline at matched settings) and a non-targeted optimisation attack (``build_attack("optimization")`` on the
   objective of the source alone, :func:`~modules.victims.captioner.caption_ensemble`: Adam in tanh space,
   lambda = 0, fixed iterations, as Liu et al. 2017 section 3.1). Every adversarial set is captioned by every model:
   ``transfer.matrix.{targeted,targeted_optimization,non_targeted}[source][model]``.
2. **Leave-one-out ensembles** (Liu et al. 2017, section 5, Tables 3-4). For each model held out, the other models
   form an ensemble (equal weights; targeted: ``ensemble_objective``, by default the members' Show-and-Fool margins
   summed, so the target must hold on every member; non-targeted: eq. 6's mixture) attacked with the optimisation,
   FG and FGS methods, targeted and not, and the images are evaluated on every model, the held-out one included
   (``on_held_out``; ``on_members.target_hit``: the share of images whose caption is the target on every member).
   The FG / FGS budgets are matched to the RMSD of the optimisation attack of the same row (FGS:
   ``eps = RMSD / 255``; FG: ``eps = RMSD * sqrt(3 H W) / 255``), as Liu et al. 2017 matches the distortion of its
   methods. Targeted ensemble targets are chosen (Show-and-Fool's rule) from the clean captions of the **first
   ensemble member**: the held-out model is a black box, so its captions are not used.
   Each row also carries the single-model transfer to the held-out model from each ensemble member alone
   (``single_model_transfer``: mean and best over those sources; targeted rows: the optimisation at the ensembles'
   budget, and Show-and-Fool's in ``single_model_show_and_fool``), the honest baseline for the ensemble's gain.
   Besides the exact target hit, targeted cells report partial transfer (``target_words``: the share of the target's
   content words the caption contains, Show-and-Fool's keyword view).

Targets chosen from model captions need two images with different captions; when a (barely trained) model gives every
image the same caption, the first reference captions of the images are used instead (recorded as ``targets_from``).
Every attacked image is evaluated, successful on the source or not (Show-and-Fool, Chen et al. 2018 transfers only
white-box successes; the white-box success rate is recorded next to the matrix).

The attacks and their evaluation live in :mod:`modules.transfer_study`; the report in
:mod:`lightning_app.studies.transfer_report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.studies.transfer_report import examples_png, report_transfer_study, summary
from lightning_app.training import train_captioner
from modules.captioning import CaptioningModule
from modules.captions import caption_batches, caption_images
from modules.evaluation import bleu_of, evaluation_loader
from modules.transfer import matrix_to_json
from modules.transfer_study import (
    ENSEMBLE_METHODS,
    KINDS,
    MODELS,
    AttackedImages,
    EnsembleRows,
    SingleModelAttacks,
    TransferStudyConfig,
    attack_descriptions,
    leave_one_out_ensembles,
    single_model_attacks,
)

__all__ = ["ENSEMBLE_METHODS", "MODELS", "STUDY", "TransferOutcome", "TransferStudyConfig", "run_and_report"]


@dataclass
class TransferOutcome:
    """A finished transfer study: its results.json entries and what the example figure draws from.

    Attributes:
        results: ``dataset``, ``transfer``, ``ensemble``, ``config`` and ``seconds`` (plain JSON).
        models: The studied captioners, by name.
        images: The attacked test images and every model's clean captions.
        single: The single-model attacks.
        ensembles: The leave-one-out ensemble rows and images.
    """

    results: dict[str, Any]
    models: dict[str, CaptioningModule]
    images: AttackedImages
    single: SingleModelAttacks
    ensembles: EnsembleRows


# -- models ---------------------------------------------------------------------------------------------------------
def _checkpoint_names(paths: tuple[str, ...]) -> list[str]:
    """Readable unique names: the file stem, or the run directory for Lightning's ``best`` / ``last`` files."""
    names = []
    for path in map(Path, paths):
        names.append(path.parent.name if path.stem in ("best", "last") and path.parent.name else path.stem)
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _load_checkpoints(cfg: TransferStudyConfig, image_size: int) -> tuple[dict[str, CaptioningModule], list[dict]]:
    from lightning_app.export import load_module

    models, info = {}, []
    for name, path in zip(_checkpoint_names(cfg.checkpoints), cfg.checkpoints, strict=True):
        module = load_module(path)
        if module.hparams.image_size != image_size:
            raise RobucapError(
                f"checkpoint {path} takes {module.hparams.image_size} px images but the data is {image_size} px: "
                f"pass --data.image_size {module.hparams.image_size}"
            )
        models[name] = module.eval()
        info.append(
            {
                "name": name,
                "arch": module.architecture,
                "overrides": None,
                "parameters": sum(p.numel() for p in module.captioner.parameters()),
                "seed": None,
                "checkpoint": str(path),
            }
        )
    return models, info


def _train_models(
    datamodule: CaptionDataModule, out: Path, cfg: TransferStudyConfig
) -> tuple[dict[str, CaptioningModule], list[dict]]:
    models, info = {}, []
    for index, spec in enumerate(cfg.models, start=1):
        seed = cfg.seed + spec.seed_offset
        L.seed_everything(seed, workers=True)
        init_args: dict[str, Any] = {"preset": cfg.preset}
        if spec.overrides:
            init_args["overrides"] = spec.overrides
        module = CaptioningModule.with_tokenizer(
            datamodule.tokenizer, captioner={"class_path": spec.arch, "init_args": init_args},
            image_size=datamodule.image_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        )  # fmt: skip
        size = f"{cfg.preset}+{spec.overrides}" if spec.overrides else cfg.preset
        print(f"[transfer study] {index}/{len(cfg.models)} {spec.name}: {cfg.epochs} epochs of {spec.arch}/{size}")
        run = train_captioner(datamodule, module, out, spec.name, cfg.epochs, wandb=cfg.wandb, test=False)
        models[spec.name] = run.module.eval()
        info.append(
            {
                "name": spec.name,
                "arch": spec.arch,
                "overrides": spec.overrides,
                "parameters": sum(p.numel() for p in run.module.captioner.parameters()),
                "seed": seed,
                "checkpoint": str(run.checkpoint),
                "train_seconds": round(run.train_seconds, 1),
            }
        )
    return models, info


def _datamodule(data: dict[str, Any], cfg: TransferStudyConfig) -> CaptionDataModule:
    datamodule = CaptionDataModule(
        **data, batch_size=cfg.batch_size, limit_train=cfg.train_images, limit_val=cfg.val_images,
        limit_test=cfg.test_images,
    )  # fmt: skip
    datamodule.prepare_data()
    if cfg.checkpoints is None:
        datamodule.setup("fit")
    datamodule.setup("test")
    if cfg.images > len(datamodule.datasets["test"]):
        raise RobucapError(
            f"transfer study images ({cfg.images}) exceeds the {len(datamodule.datasets['test'])} test images; "
            "lower --study.images"
        )
    return datamodule


def run_transfer_study(data: dict[str, Any], out: Path, cfg: TransferStudyConfig) -> TransferOutcome:
    """Train (or load) the models, attack, evaluate.

    Args:
        data: :class:`~datamodules.datamodule.CaptionDataModule` arguments (``format``, ``root``, ``image_size``...).
        out: Directory for logs and checkpoints.
        cfg: Study settings.
    """
    start = time.perf_counter()
    datamodule = _datamodule(data, cfg)
    test_set = datamodule.datasets["test"]
    if cfg.checkpoints is None:
        models, info = _train_models(datamodule, Path(out), cfg)
    else:
        models, info = _load_checkpoints(cfg, datamodule.image_size)
    for row in info:
        records = caption_batches(models[row["name"]], evaluation_loader(models[row["name"]], test_set, None, 64))
        row["test_bleu4"] = bleu_of(records)["bleu4"]
        row["test_images"] = len(records)
    first = next(iter(models.values()))
    batch = next(iter(evaluation_loader(first, test_set, cfg.images, cfg.images)))
    x = batch["pixel_values"]
    images = AttackedImages(
        x,
        [list(r) for r in batch["references"]],
        list(batch["image_id"]),
        {n: caption_images(m, x, cfg.attack_batch_size) for n, m in models.items()},
    )
    single = single_model_attacks(models, images, cfg)  # 1. each model alone
    ensembles = leave_one_out_ensembles(models, images, single, cfg)  # 2. leave-one-out ensembles
    names = list(models)
    results = {
        "dataset": datamodule.describe(),
        "transfer": {
            "models": info,
            "images": cfg.images,
            "image_ids": images.image_ids,
            # targeted_optimization is empty (and left out) when the models do not share one vocabulary.
            "matrix": {kind: matrix_to_json(single.matrix[kind]) for kind in KINDS if single.matrix[kind]},
            "rmsd": {
                kind: {s: single.matrix[kind][s][names[0]].rmsd for s in names} for kind in KINDS if single.matrix[kind]
            },
            "white_box_show_and_fool": single.white_box,
            "targets": single.targets,
            "targets_from": single.targets_from,
            "clean_captions": images.clean,
            "attacks": attack_descriptions(cfg),
        },
        "ensemble": {
            "rows": ensembles.rows,
            "weights": "equal",
            "targets": ensembles.targets,
            "targeted_skipped": None
            if ensembles.shared_vocabulary
            else "the models do not share one vocabulary: targeted ensembles need one (targets are token ids)",
            "fast_budget_rule": "FG / FGS budgets matched to the RMSD r of the optimisation attack of the same row"
            if cfg.fast_rmsd is None
            else f"FG / FGS budgets matched to RMSD {cfg.fast_rmsd}",
        },
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return TransferOutcome(results, models, images, single, ensembles)


def run_and_report(data: dict[str, Any], out: Path, cfg: TransferStudyConfig, report: Report) -> dict[str, Any]:
    """Run the study, add it to ``report`` and return its results entries (the demo's transfer stage)."""
    outcome = run_transfer_study(data, out, cfg)
    STUDY.report(outcome, report)
    return outcome.results


class TransferStudy(Study[TransferStudyConfig, TransferOutcome]):
    """``robucap study transfer``."""

    name = "transfer"
    help = "Show-and-Fool (Chen et al. 2018), Liu et al. 2017: transfer matrix and leave-one-out ensembles."
    settings_type = TransferStudyConfig

    def run(self, settings: TransferStudyConfig, data: StudyData, out: Path) -> TransferOutcome:
        """Train (or load) the captioners, attack them and evaluate every transfer."""
        return run_transfer_study(data.module_options(), out, settings)

    def report(self, outcome: TransferOutcome, report: Report) -> None:
        """The tables and the example figure."""
        report_transfer_study(report, outcome.results)
        report.paragraph(
            "Example images: original, adversarial and their difference, with the captions of every model."
        )
        report.image(examples_png(outcome), "transfer examples")

    def results(self, outcome: TransferOutcome) -> dict[str, Any]:
        """``dataset``, ``transfer``, ``ensemble``, ``config`` and ``seconds``."""
        return outcome.results

    def summary(self, results: dict[str, Any]) -> str:
        """Single-model and ensemble transfer, off the diagonal."""
        return summary(results)


STUDY = TransferStudy()
