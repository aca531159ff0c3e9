"""``robucap study freeze``: the five phases of Rashid & Rivas 2024 on shapes (or any caption data).

1. ``baseline``: clean training from scratch.
2. ``adversarial_only``: fine-tuned on FGSM images only (online, against the current weights; ``static`` optional).
3. ``adversarial_training``: fine-tuned on clean + FGSM images in the same step.
4. ``freeze_encoder``: as 3 with the vision encoder frozen (paper: "freezing ViT").
5. ``freeze_decoder``: as 3 with the language decoder frozen, cross-attention included (paper: "freezing GPT").

Two regimes (``start``). ``baseline`` (default): the baseline plays the pretrained model's role; phases 2-5 start
from its weights and fine-tune for ``finetune_epochs``. ``pretrained``: as Rashid & Rivas 2024 start from pretrained
ViT and GPT-2, every phase (the baseline's clean fine-tuning included) starts from separately pretrained parts joined
by new cross-attention (``freeze_pretrained.py``) and trains for ``pretrained_epochs``. Every phase but the baseline
regime's baseline runs ``trials`` times (mean ± std). Every row is scored on a fixed subset of training images and on
the test split, clean and under FGSM (white-box against that row's model), and records which parameter groups it
trained.
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
from callbacks.freeze_cross_attention import FreezeDecoderKeepCrossAttention
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.studies.freeze_pretrained import (
    ParameterGroups,
    Parts,
    check_part_dirs,
    parameter_groups,
    resolve_parts,
)
from lightning_app.studies.freeze_report import example_grid_png, report_freeze_study
from lightning_app.studies.freeze_scores import mean_std, score, zero_std
from lightning_app.training import train_captioner
from modules.attacks.base import check_epsilon
from modules.captioning import CaptioningModule

PHASES = ("baseline", "adversarial_only", "adversarial_training", "freeze_encoder", "freeze_decoder")
CROSS_ATTENTION = ("auto", "decoder", "trainable", "both")
# The extra row of cross_attention='both': the decoder frozen, its cross-attention trained.
FREEZE_DECODER_CROSS = "freeze_decoder_train_cross_attention"


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
    """Seeds per phase (mean ± std); the baseline regime's baseline is trained once."""
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
    arch: str = "vit_gpt2"
    """Captioner (``tiny`` preset): ``vit_gpt2`` or ``show_attend_tell`` (``start: baseline`` only)."""
    start: str = "baseline"
    """``baseline``: phases 2-5 fine-tune a captioning-trained baseline. ``pretrained``: every phase starts from
    pretrained encoder and decoder parts joined by new cross-attention (Rashid & Rivas 2024's regime)."""
    encoder_dir: str | None = None
    """``start: pretrained``: ``save_pretrained`` directory of the ViT encoder (with ``decoder_dir``); ``None``: the
    study pretrains both parts itself under ``<out>/parts`` with the ``pretrain_*`` settings."""
    decoder_dir: str | None = None
    """``start: pretrained``: ``save_pretrained`` directory of the GPT-2 decoder and its tokenizer (the data's)."""
    pretrained_epochs: float = 0.3
    """``start: pretrained``: epochs of every phase from the parts (fractions allowed), at ``lr``."""
    cross_attention: str = "auto"
    """Which part cross-attention belongs to when the decoder is frozen: ``decoder`` (frozen with it),
    ``trainable`` (trained with the encoder), ``both`` (one row each) or ``auto`` (``both`` from pretrained parts,
    whose cross-attention is new; ``decoder`` in the baseline regime, as before)."""
    pretrain_encoder_epochs: float = 4.0
    """Epochs of the encoder pretraining when the study makes the parts (shapes data only)."""
    pretrain_decoder_epochs: float = 1.0
    """Epochs of the decoder pretraining (causal language modelling of the training captions) when made here."""

    @property
    def cross_attention_rows(self) -> str:
        """``cross_attention`` with ``auto`` resolved for this regime."""
        if self.cross_attention == "auto":
            return "both" if self.start == "pretrained" else "decoder"
        return self.cross_attention

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        if self.start not in ("baseline", "pretrained"):
            raise RobucapError(f"--study.start must be 'baseline' or 'pretrained', got {self.start!r}")
        if self.arch not in ("vit_gpt2", "show_attend_tell"):
            raise RobucapError(f"--study.arch must be 'vit_gpt2' or 'show_attend_tell', got {self.arch!r}")
        if self.start == "pretrained" and self.arch != "vit_gpt2":
            raise RobucapError(
                f"--study.start pretrained needs --study.arch vit_gpt2 (pretrained ViT + GPT-2 parts), not {self.arch}"
            )
        if self.cross_attention not in CROSS_ATTENTION:
            raise RobucapError(
                f"--study.cross_attention must be one of {list(CROSS_ATTENTION)}, got {self.cross_attention!r}"
            )
        if self.start == "baseline" and (self.encoder_dir or self.decoder_dir):
            raise RobucapError("--study.encoder_dir / --study.decoder_dir need --study.start pretrained")
        check_part_dirs(self.encoder_dir, self.decoder_dir)
        if min(self.pretrained_epochs, self.pretrain_encoder_epochs, self.pretrain_decoder_epochs) <= 0:
            raise RobucapError("freeze study pretrained_epochs and pretrain_*_epochs must be > 0")
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
    parameter_groups: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Phase:
    """One phase's plan: name, AdversarialTraining mode (``None``: clean training), freeze callback, trials."""

    name: str
    mode: str | None
    freeze: type[L.Callback] | None
    trials: int


@dataclass
class StartPoint:
    """Where the phases start: the baseline's checkpoint (baseline regime) or the pretrained parts."""

    checkpoint: Path | None
    parts: Parts | None = None
    prefix: str = ""
    new_groups: frozenset[str] = frozenset()


def _phases(cfg: FreezeStudyConfig) -> list[Phase]:
    """Phases 2-5 (and the extra cross-attention row), each ``trials`` times; in the pretrained regime also phase 1
    (the baseline regime's baseline is one model, shared by the phases that fine-tune it)."""
    keep = {"decoder": FreezeDecoder, "trainable": FreezeDecoderKeepCrossAttention, "both": FreezeDecoder}
    plans = [Phase("baseline", None, None, cfg.trials)] if cfg.start == "pretrained" else []
    plans += [
        Phase("adversarial_only", cfg.adversarial_only_mode, None, cfg.trials),
        Phase("adversarial_training", "mixed", None, cfg.trials),
        Phase("freeze_encoder", "mixed", FreezeEncoder, cfg.trials),
        Phase("freeze_decoder", "mixed", keep[cfg.cross_attention_rows], cfg.trials),
    ]
    if cfg.cross_attention_rows == "both":
        plans.append(Phase(FREEZE_DECODER_CROSS, "mixed", FreezeDecoderKeepCrossAttention, cfg.trials))
    return plans


def _new_module(datamodule: CaptionDataModule, cfg: FreezeStudyConfig, parts: Parts | None) -> CaptioningModule:
    """A captioner from the pretrained parts (new cross-attention), or at random (the baseline regime's baseline)."""
    if parts is None:
        init_args: dict[str, Any] = {"preset": "tiny"}
    else:
        init_args = {"preset": "pretrained", "encoder_dir": parts.encoder_dir, "decoder_dir": parts.decoder_dir}
    return CaptioningModule.with_tokenizer(
        datamodule.tokenizer, captioner={"class_path": cfg.arch, "init_args": init_args},
        image_size=datamodule.image_size, lr=cfg.lr, warmup_steps=100 if parts is None else 20,
    )  # fmt: skip


def _run_phase(
    phase: Phase, index: int, datamodule: CaptionDataModule, out: Path, cfg: FreezeStudyConfig, start: StartPoint
) -> Row:
    runs: list[dict[str, Any]] = []
    total = 5 + (cfg.cross_attention_rows == "both")
    for trial in range(phase.trials):
        seed = cfg.seed + trial
        L.seed_everything(seed, workers=True)
        if start.parts is not None:
            module, epochs_setting = _new_module(datamodule, cfg, start.parts), cfg.pretrained_epochs
        else:
            module = CaptioningModule.load_from_checkpoint(start.checkpoint, map_location="cpu", weights_only=True)
            module.hparams.lr, module.hparams.warmup_steps = cfg.finetune_lr, 10
            epochs_setting = cfg.finetune_epochs
        counter = ParameterGroups(start.new_groups)
        callbacks: list[L.Callback] = [counter]
        if phase.mode is not None:
            static = phase.mode == "static"
            callbacks.append(
                AdversarialTraining(
                    mode=phase.mode, epsilon=cfg.epsilon, checkpoint=str(start.checkpoint) if static else None,
                    cache_dir=str(out / "cache" / "static_fgsm") if static else None,
                )
            )  # fmt: skip
        if phase.freeze is not None:
            callbacks.append(phase.freeze())
        label = f"{start.prefix}{phase.name}" + (f"_seed{seed}" if phase.trials > 1 else "")
        print(
            f"[freeze study] phase {index}/{total} {label}: {epochs_setting} epoch(s), {phase.mode or 'clean'} training"
        )
        epochs, limit = _epochs(epochs_setting)
        run = train_captioner(
            datamodule, module, out, label, epochs, wandb=cfg.wandb, callbacks=callbacks, test=False,
            trainer_kwargs={"limit_train_batches": limit},
        )  # fmt: skip
        if start.parts is not None and phase.name == "baseline" and start.checkpoint is None:
            start.checkpoint = run.checkpoint  # static FGSM images are crafted against the first baseline
        runs.append(
            {"seed": seed, "scores": score(run.module, datamodule, cfg), "seconds": run.train_seconds,
             "groups": counter.counts, "checkpoint": str(run.checkpoint)}
        )  # fmt: skip
    mean, std = mean_std(runs)
    groups = runs[0]["groups"]
    return Row(phase.name, mean["train"], mean["test"], phase.trials, std,
               sum(g["trainable"] for g in groups.values()), round(statistics.fmean(r["seconds"] for r in runs), 1),
               runs[0]["checkpoint"], [{"seed": r["seed"], **r["scores"]} for r in runs], groups)  # fmt: skip


def run_freeze_study(
    datamodule: CaptionDataModule,
    out: Path,
    cfg: FreezeStudyConfig,
    baseline: CaptioningModule | None = None,
    baseline_checkpoint: Path | None = None,
    baseline_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the phases of ``cfg.start``'s regime and return the ``freeze_study`` block of ``results.json``.

    Args:
        datamodule: Data, set up for ``fit`` and ``test``.
        out: Directory for logs and checkpoints (and ``parts`` when the study pretrains them).
        cfg: Study settings.
        baseline: An already trained baseline (the demo passes its own) with its checkpoint and training seconds;
            ignored in the pretrained regime, whose baseline is fine-tuned from the parts.
        baseline_checkpoint: Checkpoint of ``baseline``.
        baseline_seconds: Training seconds of ``baseline``.
    """
    out = Path(out)
    rows: list[Row] = []
    regime: dict[str, Any] = {}
    if cfg.start == "pretrained":
        settings = {"encoder_epochs": cfg.pretrain_encoder_epochs, "decoder_epochs": cfg.pretrain_decoder_epochs,
                    "lr": cfg.lr, "batch_size": cfg.batch_size}  # fmt: skip
        parts = resolve_parts(datamodule, out, cfg.encoder_dir, cfg.decoder_dir, settings)
        new = frozenset({"cross_attention", "projection"})
        start = StartPoint(None, parts, "pretrained_", new)
        regime = {"parts": asdict(parts), "new_groups": sorted(new)}
    else:
        if baseline is None:
            L.seed_everything(cfg.seed, workers=True)
            module = _new_module(datamodule, cfg, None)
            print(f"[freeze study] phase 1/5 baseline: {cfg.baseline_epochs} epochs")
            run = train_captioner(datamodule, module, out, "baseline", cfg.baseline_epochs, wandb=cfg.wandb, test=False)
            baseline, baseline_checkpoint, baseline_seconds = run.module, run.checkpoint, run.train_seconds
        scores = score(baseline, datamodule, cfg)
        groups = parameter_groups(baseline.captioner)
        rows.append(
            Row("baseline", scores["train"], scores["test"], 1, zero_std(), _trainable(baseline),
                round(float(baseline_seconds or 0.0), 1), str(baseline_checkpoint), [], groups)
        )  # fmt: skip
        start = StartPoint(Path(str(baseline_checkpoint)))
        regime = {"parts": None, "new_groups": []}
    first = 1 if cfg.start == "pretrained" else 2
    for index, phase in enumerate(_phases(cfg), start=first):
        rows.append(_run_phase(phase, index, datamodule, out, cfg, start))
    table = [asdict(r) for r in rows]
    return {
        "epsilon": cfg.epsilon,
        "epsilon_255": round(cfg.epsilon * 255, 2),
        "epsilon_vit_input": cfg.epsilon * 2,
        "config": asdict(cfg),
        "rows": table,
        "regimes": {cfg.start: {"rows": table, "cross_attention": cfg.cross_attention_rows, **regime}},
    }


def _epochs(finetune_epochs: float) -> tuple[int, float | int]:
    """Whole epochs, or one epoch limited to a fraction of the training batches."""
    if finetune_epochs >= 1:
        return int(round(finetune_epochs)), 1.0
    return 1, float(finetune_epochs)


def _trainable(module: CaptioningModule) -> int:
    return sum(p.numel() for p in module.captioner.parameters() if p.requires_grad)


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
        """Set up the data and run the phases of ``settings.start``'s regime."""
        # The pretrained decoder's vocabulary is its tokenizer's: the data takes it, as a captioner from gpt2 would.
        datamodule = CaptionDataModule(
            **data.module_options(self.data_seed(settings)),
            batch_size=settings.batch_size,
            tokenizer=settings.decoder_dir,
        )
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
