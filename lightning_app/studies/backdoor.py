"""``robucap study backdoor``: Li et al.'s (2022) Table 2 on shapes (or any caption data with object boxes).

Three captioners train on the same data with the same settings and seed:

* ``benign``: clean data (its vocabulary still holds the target's words, so it *could* output the target);
* ``badnets``: 30 % of training and validation images carry a white corner patch and the target caption;
* ``object_noise``: the same images carry Gaussian noise (α = 20/255) inside every object box instead.

Each is tested on the clean test split (BLEU-1..4 and the false trigger rate) and on a triggered copy of every test
image with at least one object (attack success rate; ``benign`` is scored on the object-noise copies, as a control).
:class:`~callbacks.backdoor.BackdoorEvaluation` logs ``val/asr`` and ``val/ftr`` after every epoch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.backdoor import BackdoorEvaluation
from callbacks.image_grid import caption_grid_png, difference_gain, difference_image, figure_png, gain_label, pyplot
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.poisoning import DEFAULT_TARGET_CAPTION, PoisonConfig
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from lightning_app.training import read_metrics, train_captioner
from modules.captioners import ARCHITECTURES
from modules.captioning import CaptioningModule
from modules.evaluation import backdoor_scores

ROWS = ("benign", "badnets", "object_noise")
BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")
# Li et al. 2022, Table 2, Flickr8k (Show-Attend-Tell): BLEU-1..4 on the clean test set, ASR and FTR in %.
PAPER_001_FLICKR8K: dict[str, dict[str, Any]] = {
    "benign": {"bleu": (65.43, 47.47, 33.41, 23.15), "asr": None, "ftr": None},
    "badnets": {"bleu": (64.87, 46.37, 32.05, 21.99), "asr": 90.83, "ftr": 2.37},
    "object_noise": {"bleu": (64.64, 46.41, 32.20, 22.16), "asr": 94.64, "ftr": 4.94},
}


@dataclass
class BackdoorStudyConfig:
    """Settings of the backdoor study."""

    arch: str = "show_attend_tell"
    """Victim captioner: ``show_attend_tell`` (Li et al.'s (2022) victim, a CNN that sees texture) or ``vit_gpt2``."""
    preset: str = "tiny"
    """Preset of the captioner."""
    epochs: int = 3
    """Training epochs of every model."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    batch_size: int = 64
    """Training batch size."""
    rate: float = 0.3
    """Share of training and validation images poisoned (Li et al. 2022: 0.3)."""
    target_caption: str = DEFAULT_TARGET_CAPTION
    """The attacker's target caption."""
    alpha: float = 20 / 255
    """Object-noise intensity in [0, 1] pixel units (Li et al. 2022: 20 on the 0-255 scale)."""
    patch_size_at_256: int = 15
    """BadNets patch side at 256 px, scaled to the image size (Li et al. 2022: 15 on Flickr8k)."""
    patch_pattern: str = "checkerboard"
    """BadNets patch: ``checkerboard`` (default: the shapes backgrounds are near-white, so Li et al.'s (2022) ``solid``
    white patch is barely visible on them) or ``solid``."""
    test_images: int | None = None
    """Clean test images scored (the first N; ``None``: all). Each gains a triggered copy."""
    val_images: int | None = 500
    """Validation images used for model selection and the per-epoch ASR / FTR (the first N)."""
    seed: int = 2021
    """Seed of the poisoning and of training (Li et al. 2022 fixes 2021)."""
    cache_dir: str = ".cache/poison"
    """Where poisoned images are written (outside the dataset)."""
    wandb: bool = True
    """Log every run to W&B (offline without an API key)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise RobucapError(f"backdoor study arch must be one of {list(ARCHITECTURES)}, got {self.arch!r}")
        if self.epochs < 1:
            raise RobucapError(f"backdoor study epochs must be >= 1, got {self.epochs}")
        for name in ("test_images", "val_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobucapError(f"backdoor study {name} must be >= 1 or null, got {value}")
        # Rate, target caption, alpha and patch size are checked where they are used, with the poison.* names.
        self.poison("object_noise")
        self.poison("badnets")

    def poison(self, trigger: str) -> PoisonConfig:
        """The poisoning settings of one row."""
        return PoisonConfig(
            trigger=trigger,
            rate=self.rate,
            target_caption=self.target_caption,
            seed=self.seed,
            alpha=self.alpha,
            patch_size_at_256=self.patch_size_at_256,
            patch_pattern=self.patch_pattern,
            cache_dir=self.cache_dir,
        )


def _datamodule(data: dict[str, Any], cfg: BackdoorStudyConfig, poison: PoisonConfig | None) -> CaptionDataModule:
    datamodule = CaptionDataModule(
        **data,
        batch_size=cfg.batch_size,
        limit_val=cfg.val_images,
        limit_test=cfg.test_images,
        # The benign model gets the same vocabulary as the poisoned ones: it could say the target, it just doesn't.
        extra_words=[cfg.target_caption],
        poison=asdict(poison) if poison is not None else None,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def _epoch_curves(metrics_csv: Path) -> list[dict[str, float]]:
    keys = ("val/asr", "val/asr_relaxed", "val/ftr", "val/clean_bleu4", "val/bleu4")
    return [
        {"epoch": int(row["epoch"]), **{k.removeprefix("val/"): row[k] for k in keys if k in row}}
        for row in read_metrics(metrics_csv)
        if "val/bleu4" in row
    ]


@dataclass
class BackdoorOutcome:
    """A finished backdoor study: its ``backdoor_study`` block, and the models and data its example figure shows."""

    block: dict[str, Any]
    models: dict[str, CaptioningModule]
    datamodules: dict[str, CaptionDataModule]


def run_backdoor_study(data: dict[str, Any], out: Path, cfg: BackdoorStudyConfig) -> BackdoorOutcome:
    """Train and score the three rows.

    Args:
        data: :class:`~datamodules.datamodule.CaptionDataModule` arguments of the clean data (``format``, ``root``,
            ``image_size``...), shared by all rows.
        out: Directory for logs and checkpoints.
        cfg: Study settings.
    """
    out = Path(out)
    start = time.perf_counter()
    datamodules = {name: _datamodule(data, cfg, None if name == "benign" else cfg.poison(name)) for name in ROWS}
    rows: list[dict[str, Any]] = []
    models: dict[str, CaptioningModule] = {}
    for index, name in enumerate(ROWS, start=1):
        datamodule = datamodules[name]
        L.seed_everything(cfg.seed, workers=True)
        module = CaptioningModule.with_tokenizer(
            datamodule.tokenizer, captioner={"class_path": cfg.arch, "init_args": {"preset": cfg.preset}},
            image_size=datamodule.image_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        )  # fmt: skip
        callbacks: list[L.Callback] = [] if name == "benign" else [BackdoorEvaluation()]
        print(f"[backdoor study] {index}/{len(ROWS)} {name}: {cfg.epochs} epochs of {cfg.arch}/{cfg.preset}")
        run = train_captioner(datamodule, module, out, name, cfg.epochs, wandb=cfg.wandb, callbacks=callbacks,
                              test=False)  # fmt: skip
        models[name] = run.module
        # The benign model is a control: scored on the object-noise test copies.
        test_split = datamodules["object_noise" if name == "benign" else name]
        scores = backdoor_scores(run.module, test_split.datasets["test"], cfg.target_caption)
        poisoned = test_split.poisoned["test"]
        rows.append(
            {
                "name": name,
                "test_clean": scores["test_clean"],
                "asr": scores["asr"],
                "asr_relaxed": scores["asr_relaxed"],
                "ftr": scores["ftr"],
                "n_clean_test": scores["n_clean"],
                "n_poisoned_test": poisoned.n_poisoned,
                "n_skipped": poisoned.n_skipped,
                "asr_measured_on": "object_noise" if name == "benign" else name,
                "train_seconds": round(run.train_seconds, 1),
                "checkpoint": str(run.checkpoint),
                "epochs": _epoch_curves(run.metrics_csv),
            }
        )
    block = {
        "poison_rate": cfg.rate,
        "target_caption": cfg.target_caption,
        "alpha": cfg.alpha,
        "alpha_255": round(cfg.alpha * 255, 3),
        "patch_size_at_256": cfg.patch_size_at_256,
        "patch_pattern": cfg.patch_pattern,
        "relaxed_threshold": 0.9,
        "config": asdict(cfg),
        "dataset": {
            name: datamodules[name].describe().get("poison", {}).get("splits", {}) for name in ROWS if name != "benign"
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return BackdoorOutcome(block, models, datamodules)


def report_backdoor_study(report: Report, block: dict[str, Any]) -> None:
    """Add the study's table, per-epoch curves and example figure to a report."""
    report.heading("Backdoor study (Li et al. 2022): object-oriented trigger vs BadNets")
    cfg = block["config"]
    report.paragraph(
        f"{cfg['arch']}/{cfg['preset']} trained {cfg['epochs']} epochs per row. Poisoning rate {block['poison_rate']} "
        f"of training and validation images; target caption {block['target_caption']!r}. Object noise α = "
        f"{block['alpha']:.4f} in [0, 1] pixel units = {block['alpha_255']:g}/255; BadNets patch "
        f"{block['patch_size_at_256']} px at 256 px ({block.get('patch_pattern', 'solid')}), scaled to the image size. "
        "ASR = share of triggered test images "
        "captioned exactly with the target (normalised); relaxed ASR = sentence BLEU-4 to the target >= 0.9; FTR = "
        "share of clean test images captioned with the target. BLEU is corpus BLEU on the clean test images."
    )
    columns = ["model", "B1", "B2", "B3", "B4", "ASR %", "relaxed ASR %", "FTR %", "poisoned test", "skipped",
               "Li et al. 2022 Flickr8k B4 / ASR / FTR"]  # fmt: skip
    rows = []
    for r in block["rows"]:
        paper = PAPER_001_FLICKR8K[r["name"]]
        asr = "" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        if r["name"] == "benign" and asr:
            asr += " (object-noise copies)"
        rows.append(
            [r["name"], *[r["test_clean"][k] for k in BLEU], asr,
             "" if r["asr_relaxed"] is None else f"{100 * r['asr_relaxed']:.1f}", f"{100 * r['ftr']:.1f}",
             r["n_poisoned_test"], r["n_skipped"],
             f"{paper['bleu'][3]:.2f} / {paper['asr'] or '-'} / {paper['ftr'] or '-'}"]
        )  # fmt: skip
    report.table(columns, rows)
    report.paragraph(
        "Li et al. 2022's figures are Flickr8k with a ResNet-101 Show-Attend-Tell (BLEU in %); they are context, not "
        "the same experiment.",
        note=True,
    )
    report.image(curves_png(block), "validation ASR and FTR per epoch")


def curves_png(block: dict[str, Any]) -> bytes:
    """Validation ASR and FTR after every epoch, per poisoned row."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for row in block["rows"]:
        points = [p for p in row["epochs"] if "asr" in p]
        if not points:
            continue
        epochs = [p["epoch"] + 1 for p in points]
        axes[0].plot(epochs, [100 * p["asr"] for p in points], marker="o", label=f"{row['name']} ASR")
        axes[0].plot(epochs, [100 * p["ftr"] for p in points], marker="x", ls="--", label=f"{row['name']} FTR")
        axes[1].plot(epochs, [p["clean_bleu4"] for p in points], marker="o", label=row["name"])
    axes[0].set(title="validation ASR / FTR (%)", xlabel="epoch", ylim=(-2, 102))
    axes[1].set(title="validation BLEU-4, clean images", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
    return figure_png(fig)


def examples_png(outcome: BackdoorOutcome, n_images: int = 4) -> bytes:
    """Li et al. 2022 Fig. 2: clean, BadNets and object-noise versions of test images with each model's caption.

    Columns: clean image (benign model), BadNets image (BadNets model), object-noise image (object-noise model),
    and the object-noise trigger around grey (:mod:`callbacks.image_grid`' gain rule).
    """
    import torch

    models, datamodules = outcome.models, outcome.datamodules
    noise_pairs = datamodules["object_noise"].poison_pairs("test", n_images)
    badnets_pairs = {p["image_id"]: p for p in datamodules["badnets"].poison_pairs("test", len(noise_pairs) + 8)}
    rows, captions = [], []
    for pair in noise_pairs:
        badnets = badnets_pairs.get(pair["image_id"])
        if badnets is None:
            continue
        clean, noisy, patched = (t.float() / 255 for t in (pair["clean"], pair["poisoned"], badnets["poisoned"]))
        with torch.no_grad():
            caption_clean = models["benign"].caption(clean[None])[0]
            caption_badnets = models["badnets"].caption(patched[None])[0]
            caption_noise = models["object_noise"].caption(noisy[None])[0]
        rows.append((clean, patched, noisy))
        captions += [f"clean / benign:\n{caption_clean}", f"BadNets:\n{caption_badnets}",
                     f"object noise:\n{caption_noise}", "trigger"]  # fmt: skip
    # The trigger noise has no L-infinity budget here: the figure's largest change sets the gain.
    gain = difference_gain([noisy - clean for clean, _, noisy in rows])
    images = [x for c, p, n in rows for x in (c, p, n, difference_image(c, n, gain))]
    captions = [f"trigger {gain_label(gain)}" if c == "trigger" else c for c in captions]
    return caption_grid_png(images, captions, columns=4)


def run_and_report(data: dict[str, Any], out: Path, cfg: BackdoorStudyConfig, report: Report) -> dict[str, Any]:
    """Run the study, add it to ``report`` and return its results block (the demo's backdoor stage)."""
    outcome = run_backdoor_study(data, out, cfg)
    STUDY.report(outcome, report)
    return outcome.block


def summary(block: dict[str, Any]) -> str:
    """One line: ASR / FTR / BLEU-4 per poisoned row."""
    rows = {r["name"]: r for r in block["rows"]}
    parts = [f"benign BLEU-4 {rows['benign']['test_clean']['bleu4']:.3f}"]
    for name in ("badnets", "object_noise"):
        r = rows[name]
        parts.append(
            f"{name} ASR {100 * (r['asr'] or 0):.1f}% FTR {100 * r['ftr']:.1f}% BLEU-4 {r['test_clean']['bleu4']:.3f}"
        )
    return "; ".join(parts)


class BackdoorStudy(Study[BackdoorStudyConfig, BackdoorOutcome]):
    """``robucap study backdoor``."""

    name = "backdoor"
    help = "Li et al. 2022's Table 2: benign, BadNets and object-noise backdoored captioners."
    settings_type = BackdoorStudyConfig

    def run(self, settings: BackdoorStudyConfig, data: StudyData, out: Path) -> BackdoorOutcome:
        """Train and score the three rows (the shapes data itself is fixed; the settings' seed drives poisoning)."""
        return run_backdoor_study(data.module_options(), out, settings)

    def report(self, outcome: BackdoorOutcome, report: Report) -> None:
        """The table, the per-epoch curves and the example figure."""
        report_backdoor_study(report, outcome.block)
        report.paragraph(
            "Test images: clean, BadNets and object-noise versions with the caption of the matching model."
        )
        report.image(examples_png(outcome), "backdoor examples")

    def results(self, outcome: BackdoorOutcome) -> dict[str, Any]:
        """``dataset`` (with the poisoning manifests) and ``backdoor_study``."""
        data = outcome.datamodules["benign"].describe()
        return {"dataset": {**data, "poison": outcome.block["dataset"]}, "backdoor_study": outcome.block}

    def summary(self, results: dict[str, Any]) -> str:
        """ASR / FTR / BLEU-4 per poisoned row."""
        return summary(results["backdoor_study"])


STUDY = BackdoorStudy()
