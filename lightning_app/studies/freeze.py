"""``robucap study freeze``: the five phases of Rashid & Rivas 2024 on shapes (or any caption data).

1. ``baseline``: clean training from scratch.
2. ``adversarial_only``: fine-tuned on FGSM images only (online, against the current weights; ``static`` optional).
3. ``adversarial_training``: fine-tuned on clean + FGSM images in the same step.
4. ``freeze_encoder``: as 3 with the vision encoder frozen (paper: "freezing ViT").
5. ``freeze_decoder``: as 3 with the language decoder frozen, cross-attention included (paper: "freezing GPT").

Rashid & Rivas 2024 starts every phase from pretrained ViT and GPT-2. Here the baseline plays that role: phases 2-5
start from the baseline's weights and fine-tune for ``finetune_epochs`` — freezing a randomly initialised part
would test nothing. Phases 4 and 5 run ``trials`` times with different seeds (mean ± std). Every row is scored on a
fixed subset of training images and on the test split, clean and under FGSM (white-box against that row's model).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.adversarial_training import AdversarialTraining
from callbacks.freeze import FreezeDecoder, FreezeEncoder
from callbacks.image_grid import caption_grid_png, difference_gain, difference_image, figure_png, pyplot
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.training import train_captioner
from modules.attacks import FGSM
from modules.attacks.base import check_epsilon
from modules.captioning import CaptioningModule
from modules.captions import caption_batches
from modules.evaluation import bleu_of, evaluation_loader
from modules.victims.captioner import CaptionObjective

PHASES = ("baseline", "adversarial_only", "adversarial_training", "freeze_encoder", "freeze_decoder")
BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")
# Rashid & Rivas 2024, Table 2 (Flickr8k, BLEU, train / test); the paper gives one BLEU figure per cell.
PAPER_002_FLICKR8K = {
    "baseline": (0.285, 0.232),
    "adversarial_only": (0.164, 0.143),
    "adversarial_training": (0.217, 0.215),
    "freeze_encoder": (0.200, 0.181),
    "freeze_decoder": (0.060, 0.050),
}


@dataclass
class FreezeStudyConfig:
    """Settings of the freeze study."""

    epsilon: float = 0.05
    """FGSM budget in [0, 1] pixel units (Rashid & Rivas's (2024) 0.1 on ViT's [-1, 1] input)."""
    baseline_epochs: int = 3
    """Epochs of clean training for the baseline (from scratch)."""
    finetune_epochs: float = 0.5
    """Epochs of each fine-tuning phase (fractions allowed: a share of the training batches)."""
    trials: int = 3
    """Seeds for the freeze phases (mean ± std)."""
    train_eval_images: int = 500
    """Training images scored per row (the first N of the training split)."""
    test_eval_images: int | None = None
    """Test images scored per row (``None``: the whole test split)."""
    adversarial_only_mode: str = "adversarial"
    """``adversarial`` (online FGSM) or ``static`` (FGSM images precomputed once against the baseline)."""
    lr: float = 2e-3
    """Peak learning rate of the baseline."""
    finetune_lr: float = 1e-3
    """Peak learning rate of the fine-tuning phases."""
    batch_size: int = 64
    """Training batch size."""
    seed: int = 0
    """Seed of the baseline and of the first trial."""
    wandb: bool = True
    """Log every run to W&B (offline without an API key)."""

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        if self.trials < 1:
            raise RobucapError(f"freeze study trials must be >= 1, got {self.trials}")
        if self.baseline_epochs < 1 or self.finetune_epochs <= 0:
            raise RobucapError("freeze study baseline_epochs must be >= 1 and finetune_epochs > 0")
        if self.adversarial_only_mode not in ("adversarial", "static"):
            raise RobucapError("adversarial_only_mode must be 'adversarial' or 'static'")


@dataclass
class Row:
    """One phase's figures (means over trials)."""

    name: str
    train: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    trials: int
    std: dict[str, dict[str, dict[str, float]]]
    trainable_params: int
    train_seconds: float
    checkpoint: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)


def score(module: CaptioningModule, datamodule: CaptionDataModule, cfg: FreezeStudyConfig) -> dict[str, Any]:
    """Clean and FGSM BLEU-1..4 on the training subset and the test split."""
    attack = FGSM(cfg.epsilon)
    result: dict[str, Any] = {}
    train_view = datamodule.eval_dataset("train")
    for split, dataset, limit in (
        ("train", train_view, cfg.train_eval_images),
        ("test", datamodule.datasets["test"], cfg.test_eval_images),
    ):
        loader = evaluation_loader(module, dataset, limit, batch_size=128)
        clean = caption_batches(module, loader)
        adversarial = caption_batches(module, loader, attack=attack)
        result[split] = {"clean": bleu_of(clean), "adversarial": bleu_of(adversarial), "n_images": len(clean)}
    return result


def _mean_std(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for split in ("train", "test"):
        mean[split], std[split] = {}, {}
        for kind in ("clean", "adversarial"):
            values = {k: [r["scores"][split][kind][k] for r in runs] for k in BLEU}
            mean[split][kind] = {k: statistics.fmean(v) for k, v in values.items()}
            std[split][kind] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        mean[split]["n_images"] = runs[0]["scores"][split]["n_images"]
    return mean, std


def run_freeze_study(
    datamodule: CaptionDataModule,
    out: Path,
    cfg: FreezeStudyConfig,
    baseline: CaptioningModule | None = None,
    baseline_checkpoint: Path | None = None,
    baseline_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the five phases and return the ``freeze_study`` block of ``results.json``.

    Args:
        datamodule: Data, set up for ``fit`` and ``test``.
        out: Directory for logs and checkpoints.
        cfg: Study settings.
        baseline: An already trained baseline (the demo passes its own) with its checkpoint and training seconds.
        baseline_checkpoint: Checkpoint of ``baseline``.
        baseline_seconds: Training seconds of ``baseline``.
    """
    out = Path(out)
    rows: list[Row] = []
    if baseline is None:
        L.seed_everything(cfg.seed, workers=True)
        module = CaptioningModule.with_tokenizer(
            datamodule.tokenizer, captioner={"class_path": "vit_gpt2", "init_args": {"preset": "tiny"}},
            image_size=datamodule.image_size, lr=cfg.lr, warmup_steps=100,
        )  # fmt: skip
        print(f"[freeze study] phase 1/5 baseline: {cfg.baseline_epochs} epochs")
        run = train_captioner(datamodule, module, out, "baseline", cfg.baseline_epochs, wandb=cfg.wandb, test=False)
        baseline, baseline_checkpoint, baseline_seconds = run.module, run.checkpoint, run.train_seconds
    scores = score(baseline, datamodule, cfg)
    seconds = round(float(baseline_seconds or 0.0), 1)
    rows.append(
        Row("baseline", scores["train"], scores["test"], 1, _zero_std(), _trainable(baseline), seconds,
            str(baseline_checkpoint))
    )  # fmt: skip

    plans = [
        ("adversarial_only", cfg.adversarial_only_mode, None, 1),
        ("adversarial_training", "mixed", None, 1),
        ("freeze_encoder", "mixed", FreezeEncoder, cfg.trials),
        ("freeze_decoder", "mixed", FreezeDecoder, cfg.trials),
    ]
    for index, (name, mode, freeze, trials) in enumerate(plans, start=2):
        runs: list[dict[str, Any]] = []
        for trial in range(trials):
            seed = cfg.seed + trial
            L.seed_everything(seed, workers=True)
            module = CaptioningModule.load_from_checkpoint(baseline_checkpoint, map_location="cpu", weights_only=True)
            module.hparams.lr = cfg.finetune_lr
            module.hparams.warmup_steps = 10
            callbacks: list[L.Callback] = [
                AdversarialTraining(
                    mode=mode,
                    epsilon=cfg.epsilon,
                    checkpoint=str(baseline_checkpoint) if mode == "static" else None,
                    cache_dir=str(out / "cache" / "static_fgsm") if mode == "static" else None,
                )
            ]
            if freeze is not None:
                callbacks.append(freeze())
            label = f"{name}_seed{seed}" if trials > 1 else name
            print(f"[freeze study] phase {index}/5 {label}: {cfg.finetune_epochs} epoch(s) of {mode} FGSM training")
            epochs, limit = _epochs(cfg.finetune_epochs)
            run = train_captioner(
                datamodule, module, out, label, epochs, wandb=cfg.wandb, callbacks=callbacks, test=False,
                trainer_kwargs={"limit_train_batches": limit},
            )  # fmt: skip
            runs.append(
                {
                    "seed": seed,
                    "scores": score(run.module, datamodule, cfg),
                    "seconds": run.train_seconds,
                    "trainable": _trainable_after_freeze(run.module, freeze),
                    "checkpoint": str(run.checkpoint),
                }
            )
        mean, std = _mean_std(runs)
        rows.append(
            Row(name, mean["train"], mean["test"], trials, std, runs[0]["trainable"],
                round(statistics.fmean(r["seconds"] for r in runs), 1), runs[0]["checkpoint"],
                [{"seed": r["seed"], **r["scores"]} for r in runs])
        )  # fmt: skip
    return {
        "epsilon": cfg.epsilon,
        "epsilon_255": round(cfg.epsilon * 255, 2),
        "epsilon_vit_input": cfg.epsilon * 2,
        "config": asdict(cfg),
        "rows": [asdict(r) for r in rows],
    }


def _epochs(finetune_epochs: float) -> tuple[int, float | int]:
    """Whole epochs, or one epoch limited to a fraction of the training batches."""
    if finetune_epochs >= 1:
        return int(round(finetune_epochs)), 1.0
    return 1, float(finetune_epochs)


def _zero_std() -> dict[str, dict[str, dict[str, float]]]:
    return {s: {k: dict.fromkeys(BLEU, 0.0) for k in ("clean", "adversarial")} for s in ("train", "test")}


def _trainable(module: CaptioningModule) -> int:
    return sum(p.numel() for p in module.captioner.parameters() if p.requires_grad)


def _trainable_after_freeze(module: CaptioningModule, freeze: type | None) -> int:
    # The loaded module has every parameter trainable again; count what the freeze callback left trainable.
    total = sum(p.numel() for p in module.captioner.parameters())
    if freeze is FreezeEncoder:
        return total - sum(p.numel() for p in module.captioner.encoder.parameters())
    if freeze is FreezeDecoder:
        return total - sum(p.numel() for p in module.captioner.decoder.parameters())
    return total


def report_freeze_study(report: Report, block: dict[str, Any]) -> None:
    """Add the study's table, bar chart and notes to a report."""
    eps = block["epsilon"]
    report.heading("Freeze study (Rashid & Rivas 2024): adversarial training with the encoder or the decoder frozen")
    report.paragraph(
        f"FGSM epsilon = {eps} in [0, 1] pixel units = {eps * 255:.1f}/255 = {eps * 2:.2f} on ViT's [-1, 1] input "
        "(Rashid & Rivas 2024 used 0.1 on that input). Phases 2-5 fine-tune the baseline; attacks are white-box "
        "against each row's own model, untargeted against the first reference caption. BLEU is pycocoevalcap's corpus "
        "BLEU."
    )
    columns = ["phase", "trials", "train clean B4", "train FGSM B4", "test clean B4", "test FGSM B4", "test B1",
               "trainable params", "train s", "Rashid & Rivas 2024 train / test"]  # fmt: skip
    rows = []
    for r in block["rows"]:
        std = r["std"]["test"]["adversarial"]["bleu4"]
        paper = PAPER_002_FLICKR8K.get(r["name"])
        rows.append(
            [r["name"], r["trials"], r["train"]["clean"]["bleu4"], r["train"]["adversarial"]["bleu4"],
             r["test"]["clean"]["bleu4"],
             f"{r['test']['adversarial']['bleu4']:.4f}" + (f" ± {std:.4f}" if r["trials"] > 1 else ""),
             r["test"]["clean"]["bleu1"], r["trainable_params"], r["train_seconds"],
             f"{paper[0]:.3f} / {paper[1]:.3f}" if paper else ""]
        )  # fmt: skip
    report.table(columns, rows)
    report.paragraph(
        "Rashid & Rivas 2024's figures are Flickr8k BLEU with pretrained ViT + GPT-2 (its Table 2 does not say "
        "which BLEU order); they are context, not the same experiment.",
        note=True,
    )
    report.image(freeze_chart_png(block), "freeze study bar chart")


def freeze_chart_png(block: dict[str, Any]) -> bytes:
    """Grouped bars of test BLEU-4, clean and FGSM, per phase (error bars = std over trials)."""
    plt = pyplot()
    names = [r["name"] for r in block["rows"]]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for offset, kind, color in ((-0.2, "clean", "#4C72B0"), (0.2, "adversarial", "#DD8452")):
        values = [r["test"][kind]["bleu4"] for r in block["rows"]]
        errors = [r["std"]["test"][kind]["bleu4"] for r in block["rows"]]
        ax.bar([i + offset for i in x], values, 0.4, yerr=errors, label=f"test {kind}", color=color, capsize=3)
    ax.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("BLEU-4")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Test BLEU-4, clean vs FGSM (eps = {block['epsilon']})")
    return figure_png(fig)


def example_grid_png(block: dict[str, Any], datamodule: CaptionDataModule, n_images: int = 3) -> bytes:
    """Original / FGSM / amplified difference for a few test images, baseline vs adversarially trained (Table 1)."""
    rows = {r["name"]: r for r in block["rows"]}
    dataset = datamodule.datasets["test"]
    images, captions = [], []
    for name in ("baseline", "adversarial_training"):
        module = CaptioningModule.load_from_checkpoint(rows[name]["checkpoint"], map_location="cpu", weights_only=True)
        module.eval()
        batch = next(iter(evaluation_loader(module, dataset, n_images, batch_size=n_images)))
        clean = batch["pixel_values"]
        adversarial = FGSM(block["epsilon"])(CaptionObjective(module.captioner, batch["labels"]), clean).adversarial
        clean_captions, adversarial_captions = module.caption(clean), module.caption(adversarial)
        amplified = difference_image(clean, adversarial, difference_gain(adversarial - clean, block["epsilon"]))
        for i in range(clean.shape[0]):
            images += [clean[i], adversarial[i], amplified[i]]
            captions += [f"{name}: {clean_captions[i]}", f"FGSM: {adversarial_captions[i]}", "difference (±ε)"]
    return caption_grid_png(images, captions, columns=3)


@dataclass
class FreezeOutcome:
    """A finished freeze study: its ``freeze_study`` block and the data its example images come from."""

    block: dict[str, Any]
    datamodule: CaptionDataModule


def run_and_report(
    datamodule: CaptionDataModule, out: Path, cfg: FreezeStudyConfig, report: Report, **baseline: Any
) -> dict[str, Any]:
    """Run the study, add it to ``report`` and return its results block (the demo's freeze stage)."""
    start = time.perf_counter()
    block = run_freeze_study(datamodule, out, cfg, **baseline)
    block["seconds"] = round(time.perf_counter() - start, 1)
    STUDY.report(FreezeOutcome(block, datamodule), report)
    return block


class FreezeStudy(Study[FreezeStudyConfig, FreezeOutcome]):
    """``robucap study freeze``."""

    name = "freeze"
    help = "Rashid & Rivas 2024's five phases: adversarial training, encoder / decoder frozen."
    settings_type = FreezeStudyConfig

    def data_seed(self, settings: FreezeStudyConfig) -> int:
        """The freeze study generates its shapes data with its own seed."""
        return settings.seed

    def run(self, settings: FreezeStudyConfig, data: StudyData, out: Path) -> FreezeOutcome:
        """Set up the data and run the five phases."""
        datamodule = CaptionDataModule(**data.module_options(self.data_seed(settings)), batch_size=settings.batch_size)
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
        start = time.perf_counter()
        block = run_freeze_study(datamodule, out, settings)
        block["seconds"] = round(time.perf_counter() - start, 1)
        return FreezeOutcome(block, datamodule)

    def report(self, outcome: FreezeOutcome, report: Report) -> None:
        """The table, the bar chart and example images."""
        report_freeze_study(report, outcome.block)
        report.paragraph("Test images: clean and FGSM captions of the baseline and of the adversarially trained model.")
        report.image(example_grid_png(outcome.block, outcome.datamodule), "adversarial examples")

    def results(self, outcome: FreezeOutcome) -> dict[str, Any]:
        """``dataset`` and ``freeze_study``."""
        return {"dataset": outcome.datamodule.describe(), "freeze_study": outcome.block}

    def summary(self, results: dict[str, Any]) -> str:
        """Test BLEU-4, clean / FGSM, of the baseline and of adversarial training."""
        rows = {r["name"]: r["test"] for r in results["freeze_study"]["rows"]}
        baseline, trained = rows["baseline"], rows["adversarial_training"]
        return (
            f"test BLEU-4 clean/FGSM baseline {baseline['clean']['bleu4']:.3f}/{baseline['adversarial']['bleu4']:.3f}, "
            f"adversarial training {trained['clean']['bleu4']:.3f}/{trained['adversarial']['bleu4']:.3f}"
        )


STUDY = FreezeStudy()
