"""``robucap demo --out DIR``: the main job on the embedded default (shapes data, tiny ViT-GPT2, CPU).

The demo is a list of stages sharing one :class:`DemoContext`. Each stage adds keys to ``ctx.results`` and sections
to ``ctx.report``; later capabilities (studies) plug in with :func:`register_stage`. Each stage's outcome is recorded
under ``stages`` in ``results.json``; a stage that fails stops the demo after what it has is written
(:func:`lightning_app.stages.run_stages`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from datamodules.datamodule import CaptionDataModule
from datamodules.shapes import ShapesConfig, generate_shapes, shapes_ready
from lightning_app.inputs import shapes_root_for
from lightning_app.report import Report
from lightning_app.stages import StageRecord, run_stages
from lightning_app.training import TrainedCaptioner, read_metrics, train_captioner
from modules.captioning import CaptioningModule

PROFILES: dict[str, dict[str, Any]] = {
    # The quick profile keeps `make demo` (installation included) under 10 minutes on 2 CPU cores.
    "quick": {"epochs": 3, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100},
    "full": {"epochs": 10, "batch_size": 64, "lr": 2e-3, "warmup_steps": 200},
    # A seconds-long run on a few dozen 32 px images, for tests of the plumbing (numbers are meaningless).
    "smoke": {
        "epochs": 1,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 2,
        "shapes": {"n_train": 48, "n_val": 9, "n_test": 9, "image_size": 32},
    },
}


@dataclass
class DemoContext:
    """State shared by demo stages.

    Attributes:
        out: Output directory (``results.json``, ``report.html``, logs, checkpoints).
        data_root: Where the shapes data lives (created if missing).
        profile: ``quick`` or ``full``.
        seed: Global seed.
        wandb: Log runs to W&B (offline without an API key).
        results: The future ``results.json``.
        report: The future ``report.html``.
        state: Objects stages hand to later stages (the data module, the baseline...).
        stages: Each stage's outcome, in run order (``stages`` in ``results.json``).
    """

    out: Path
    data_root: Path
    profile: str = "quick"
    seed: int = 0
    wandb: bool = True
    results: dict[str, Any] = field(default_factory=dict)
    report: Report = field(default_factory=lambda: Report("robucap demo"))
    state: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """The profile's settings."""
        return PROFILES[self.profile]


DemoStage = Callable[[DemoContext], "str | None"]
"""A demo stage: returns ``None`` when it ran, or why it had nothing to do (recorded as ``skipped``)."""
STAGES: list[tuple[str, DemoStage]] = []


def register_stage(name: str, stage: DemoStage) -> None:
    """Append a stage to the demo (stages run in registration order; a name registered again is moved last)."""
    STAGES[:] = [(n, s) for n, s in STAGES if n != name] + [(name, stage)]


def stage_data(ctx: DemoContext) -> None:
    """Create the shapes data if missing and set up the data module."""
    config = ShapesConfig(seed=ctx.seed, **ctx.settings.get("shapes", {}))
    if not shapes_ready(ctx.data_root, config):
        print(f"[demo] writing the shapes dataset to {ctx.data_root}")
        generate_shapes(ctx.data_root, config, progress=True)
    datamodule = CaptionDataModule(
        format="coco", root=str(ctx.data_root), image_size=config.image_size, batch_size=ctx.settings["batch_size"]
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    ctx.state["datamodule"] = datamodule
    ctx.results["dataset"] = {**datamodule.describe(), "name": "shapes", "seed": ctx.seed}


def stage_baseline(ctx: DemoContext) -> None:
    """Train, test and report the tiny ViT-GPT2 baseline."""
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    s = ctx.settings
    L.seed_everything(ctx.seed, workers=True)
    module = CaptioningModule.with_tokenizer(
        datamodule.tokenizer,
        preset="tiny",
        image_size=datamodule.image_size,
        lr=s["lr"],
        warmup_steps=s["warmup_steps"],
    )
    print(f"[demo] training the tiny ViT-GPT2 baseline for {s['epochs']} epochs")
    run = train_captioner(datamodule, module, ctx.out, "baseline", max_epochs=s["epochs"], wandb=ctx.wandb)
    ctx.state["baseline"] = run
    ctx.results["baseline"] = {
        "test": {k: run.test[k] for k in sorted(run.test)},
        "val": {k: v for k, v in sorted(run.val.items()) if k.startswith("bleu")},
        "train_seconds": round(run.train_seconds, 1),
        "checkpoint": str(run.checkpoint),
        "epochs": s["epochs"],
        "model": "vit_gpt2/tiny",
        "trainable_params": sum(p.numel() for p in run.module.parameters() if p.requires_grad),
    }
    _report_baseline(ctx, run, datamodule)


def _report_baseline(ctx: DemoContext, run: TrainedCaptioner, datamodule: CaptionDataModule) -> None:
    from callbacks.image_grid import caption_grid_png

    report = ctx.report
    report.heading("Baseline: tiny ViT-GPT2 on shapes")
    ds = ctx.results["dataset"]
    report.paragraph(
        f"Shapes data at {ds['root']}: {ds['splits']} images at {ds['image_size']} px. "
        f"Trained {ctx.results['baseline']['epochs']} epochs in {run.train_seconds:.0f} s; "
        f"checkpoint {run.checkpoint}."
    )
    keys = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"]
    report.table(["split", *keys], [["test (pycocoevalcap)", *[run.test.get(k, float("nan")) for k in keys]]])
    report.paragraph("METEOR is absent when Java is not installed. SPICE is not computed.", note=True)
    report.image(training_curves_png(read_metrics(run.metrics_csv)), "training curves")
    records = run.module.test_results.get("predictions") or []
    dataset = datamodule.datasets["test"]
    position = {r.image_id: i for i, r in enumerate(dataset.store.records)}
    shown = [r for r in records if r["image_id"] in position][:12]
    if shown:
        images = [dataset.store.image(position[r["image_id"]]) for r in shown]
        captions = [f"{r['prediction']}\n(ref: {r['references'][0]})" for r in shown]
        report.image(caption_grid_png(images, captions, columns=4), "test images with generated captions")


def training_curves_png(rows: list[dict[str, float]]) -> bytes:
    """Training loss per step and validation BLEU-4 / loss per epoch, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["epoch"], r["val/bleu4"], r.get("val/loss")) for r in rows if "val/bleu4" in r]
    if train:
        axes[0].plot(*zip(*train, strict=True), lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="cross-entropy")
    if val:
        epochs = [v[0] + 1 for v in val]
        axes[1].plot(epochs, [v[1] for v in val], marker="o", label="val BLEU-4")
        axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1))
        axes[1].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def stage_freeze_study(ctx: DemoContext) -> None:
    """Rashid & Rivas's (2024) five phases on the demo's data, starting from the demo's baseline."""
    from lightning_app.studies.freeze import run_and_report, study_settings

    overrides = {"trials": 1} if ctx.profile == "smoke" else {}
    cfg = study_settings(ctx.profile, seed=ctx.seed, wandb=ctx.wandb, **overrides)
    base: TrainedCaptioner = ctx.state["baseline"]
    ctx.results["freeze_study"] = run_and_report(
        ctx.state["datamodule"],
        ctx.out / "freeze_study",
        cfg,
        ctx.report,
        baseline=base.module,
        baseline_checkpoint=base.checkpoint,
        baseline_seconds=base.train_seconds,
    )


def stage_backdoor_study(ctx: DemoContext) -> None:
    """Li et al.'s (2022) benign / BadNets / object-noise models on the demo's data."""
    from lightning_app.studies.backdoor import run_and_report, study_settings

    cfg = study_settings(ctx.profile, wandb=ctx.wandb, cache_dir=str(ctx.out / "poison_cache"))
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    data = {"format": "coco", "root": str(ctx.data_root), "image_size": datamodule.image_size}
    ctx.results["backdoor_study"] = run_and_report(data, ctx.out / "backdoor_study", cfg, ctx.report)


# Show-and-Fool settings per demo profile: the paper's 1000 iterations x 5 rounds take minutes per image batch on a
# CPU, so the quick profile runs fewer (the full attack is `robucap attack show-and-fool`, see docs/attacks.md).
# ``targets``: "paper" draws each image's target from another image's clean caption (Show-and-Fool, Chen et al.
# 2018); the smoke baseline, trained for seconds, gives every image the same caption, so no image offers another a
# target and the smoke profile attacks towards fixed targets taken from the reference captions instead.
SHOW_AND_FOOL_PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"images": 16, "iterations": 300, "rounds": 3, "targets": "paper"},
    "full": {"images": 50, "iterations": 1000, "rounds": 5, "targets": "paper"},
    "smoke": {"images": 4, "iterations": 5, "rounds": 1, "targets": "references"},
}
SHOW_AND_FOOL_MODES: tuple[str, ...] = ("caption", "keyword_1", "keyword_2", "keyword_3")


@dataclass(frozen=True)
class ModeTargets:
    """How one Show-and-Fool mode of the demo gets its targets, decided before the attack runs.

    Attributes:
        options: Extra ``robucap attack show-and-fool`` options (``--target`` or ``--keywords``); empty for
            paper-style targets.
        skip: Why the mode cannot run (no image can be given a target), else ``None``.
    """

    options: list[str] = field(default_factory=list)
    skip: str | None = None


def mode_targets(
    clean: list[str],
    references: list[list[str]],
    tokenizer: PreTrainedTokenizerBase,
    n_keywords: int,
    source: str,
    seed: int,
) -> ModeTargets:
    """The targets of one mode, checked against the baseline's clean captions of the attacked images.

    Args:
        clean: The baseline's greedy caption of each attacked image.
        references: Each image's reference captions.
        tokenizer: The baseline's tokenizer (a fixed target must be words it knows).
        n_keywords: 0 for the targeted-caption mode, else the number of target keywords.
        source: ``paper`` (another image's clean caption, as the attack chooses them) or ``references`` (one fixed
            target from the reference captions, that some clean caption does not already meet).
        seed: The attack's seed (paper-style targets are drawn with it).

    Returns:
        The options to pass, or why the mode has nothing to attack.
    """
    from datamodules.text import caption_tokens, normalize_caption
    from datamodules.tokenizer import unknown_words
    from modules.attacks.targets import content_words, paper_targets

    what = "a different caption" if n_keywords == 0 else f"{n_keywords} new content words"
    if source == "paper":
        if any(t is not None for t in paper_targets(clean, n_keywords, seed)):
            return ModeTargets()
        return ModeTargets(skip=f"no image gets a paper-style target: no other image's clean caption offers {what}")
    if source != "references":
        raise ValueError(f"unknown Show-and-Fool target source {source!r}")
    for own, refs in zip(clean, references, strict=True):
        for ref in refs:
            if unknown_words(tokenizer, ref):
                continue
            if n_keywords == 0:
                if normalize_caption(ref) != normalize_caption(own):
                    return ModeTargets(["--target", ref])
                continue
            own_words = set(caption_tokens(own))
            fresh = [w for w in content_words(ref) if w not in own_words]
            if len(fresh) >= n_keywords:
                return ModeTargets(["--keywords", ",".join(fresh[:n_keywords])])
    return ModeTargets(skip=f"no reference caption offers {what} that a clean caption lacks")


def _clean_captions(ctx: DemoContext, n_images: int) -> tuple[list[str], list[list[str]]]:
    """The baseline's greedy captions and the references of the first ``n_images`` test images (those attacked)."""
    from modules.attacks.show_and_fool import ShowAndFool
    from modules.evaluation import evaluation_loader
    from modules.targeted_eval import greedy_captions

    module = ctx.state["baseline"].module
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    batches = list(evaluation_loader(module, datamodule.eval_dataset("test"), n_images, n_images))
    images = torch.cat([b["pixel_values"] for b in batches])
    training = module.training
    module.eval()  # as the attack captions them: dropout off
    clean = greedy_captions(module, images, ShowAndFool().max_new_tokens)
    module.train(training)
    return clean, [list(r) for b in batches for r in b["references"]]


def stage_show_and_fool(ctx: DemoContext) -> str | None:
    """Show-and-Fool's (Chen et al. 2018) targeted caption and 1-3 keyword attacks on the demo's baseline."""
    from lightning_app.attack import attack_main

    base: TrainedCaptioner = ctx.state["baseline"]
    s = SHOW_AND_FOOL_PROFILES[ctx.profile]
    clean, references = _clean_captions(ctx, s["images"])
    blocks: dict[str, Any] = {}
    for n_keywords, mode in enumerate(SHOW_AND_FOOL_MODES):
        targets = mode_targets(clean, references, base.module.tokenizer, n_keywords, s["targets"], ctx.seed)
        if targets.skip is not None:
            blocks[mode] = {"success_rate": None, "mean_l2": None, "n": 0, "skipped": targets.skip}
            continue
        out = ctx.out / "show_and_fool" / mode
        attack_main(
            ["show-and-fool", "--ckpt", str(base.checkpoint), "--data-root", str(ctx.data_root), "--images",
             str(s["images"]), "--modes", mode, "--iterations", str(s["iterations"]), "--rounds", str(s["rounds"]),
             "--seed", str(ctx.seed), "--out", str(out), "--no-meteor", *targets.options]
        )  # fmt: skip
        block = json.loads((out / "results.json").read_text(encoding="utf-8"))["show_and_fool"][mode]
        blocks[mode] = {k: v for k, v in block.items() if k not in ("records", "skipped")}
        blocks[mode]["report"] = str(out / "report.html")
        if targets.options:
            blocks[mode]["target"] = targets.options[1]
    ctx.results["show_and_fool"] = {**blocks, "settings": dict(s)}
    ctx.report.heading("Show-and-Fool (Chen et al. 2018) on the baseline")
    chosen = (
        "each image's target is another image's clean caption (or content words of it), as in the paper"
        if s["targets"] == "paper"
        else "fixed targets from the reference captions (the barely trained baseline captions every image alike)"
    )
    ctx.report.paragraph(
        f"{s['images']} test images, {s['iterations']} Adam iterations x {s['rounds']} rounds of the c search "
        f"(paper: 1000 x 5); {chosen}. Mean L2 over successes, in [0, 1] pixel units. Examples and failure "
        f"statistics: the reports under {ctx.out / 'show_and_fool'}."
    )
    ctx.report.table(
        ["mode", "success rate", "mean L2", "n", "not run because"],
        [[m, b["success_rate"], b["mean_l2"], b["n"], b.get("skipped", "")] for m, b in blocks.items()],
    )
    skipped = [f"{m}: {b['skipped']}" for m, b in blocks.items() if "skipped" in b]
    return "; ".join(skipped) if len(skipped) == len(blocks) else None


def stage_transfer_study(ctx: DemoContext) -> None:
    """Transfer matrix and leave-one-out ensembles over three captioners (Show-and-Fool; Liu et al. 2017)."""
    from lightning_app.studies.transfer import run_and_report, study_settings

    cfg = study_settings(ctx.profile, seed=ctx.seed, wandb=ctx.wandb)
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    data = {"format": "coco", "root": str(ctx.data_root), "image_size": datamodule.image_size}
    block = run_and_report(data, ctx.out / "transfer_study", cfg, ctx.report)
    ctx.results["transfer"] = block["transfer"]
    ctx.results["ensemble"] = block["ensemble"]
    ctx.results["transfer_study"] = {k: v for k, v in block.items() if k not in ("transfer", "ensemble")}


register_stage("data", stage_data)
register_stage("baseline", stage_baseline)
register_stage("freeze_study", stage_freeze_study)
register_stage("backdoor_study", stage_backdoor_study)
register_stage("show_and_fool", stage_show_and_fool)
register_stage("transfer_study", stage_transfer_study)


def run_demo(out: Path, data_root: Path, profile: str = "quick", seed: int = 0, wandb: bool = True) -> DemoContext:
    """Run every registered stage, then write ``results.json`` and ``report.html`` into ``out``.

    Raises:
        RobucapError: A stage failed on bad input (``demo stage '<name>' failed: ...``), after the results of the
            stages before it were written.
        Exception: Any other exception of a stage, unchanged, after the same writing.
    """
    ctx = DemoContext(out=Path(out), data_root=Path(data_root), profile=profile, seed=seed, wandb=wandb)
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def write() -> None:
        ctx.results["profile"] = profile
        ctx.results["seconds"] = round(time.perf_counter() - start, 1)
        ctx.results["report"] = str(ctx.out / "report.html")
        ctx.results["stages"] = {name: record.to_json() for name, record in ctx.stages.items()}
        (ctx.out / "results.json").write_text(json.dumps(ctx.results, indent=2, sort_keys=True), encoding="utf-8")
        _report_stages(ctx.report, ctx.stages)
        ctx.report.write(ctx.out / "report.html")

    def bind(name: str, stage: DemoStage) -> Callable[[], str | None]:
        def run() -> str | None:
            print(f"[demo] stage {name}")
            return stage(ctx)

        return run

    run_stages("demo", [(name, bind(name, stage)) for name, stage in STAGES], ctx.stages, write)
    return ctx


def _report_stages(report: Report, stages: dict[str, StageRecord]) -> None:
    report.heading("Stages")
    report.table(
        ["stage", "status", "seconds", "note"],
        [[name, r.status, r.seconds, r.error or r.reason or ""] for name, r in stages.items()],
    )


def demo_main(argv: list[str]) -> int:
    """``robucap demo`` argument parsing."""
    parser = argparse.ArgumentParser(prog="robucap demo", description="Train, test and report on the shapes data.")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument(
        "--data", default=None,
        help="shapes data directory, created if missing (default data/shapes; data/shapes_smoke, data/shapes_seedN for "
        "the smoke profile or another seed, whose data differ: an existing dataset is never rewritten)",
    )  # fmt: skip
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    args = parser.parse_args(argv)
    data = args.data or shapes_root_for(smoke=args.profile == "smoke", seed=args.seed)
    ctx = run_demo(Path(args.out), Path(data), args.profile, args.seed, wandb=not args.no_wandb)
    test = ctx.results.get("baseline", {}).get("test", {})
    bleu4, cider = test.get("bleu4", float("nan")), test.get("cider", float("nan"))
    backdoor = ""
    if "backdoor_study" in ctx.results:
        from lightning_app.studies.backdoor import summary

        backdoor = f"; backdoor: {summary(ctx.results['backdoor_study'])}"
    print(
        f"robucap demo done in {ctx.results['seconds']:.0f} s: baseline test BLEU-4 {bleu4:.3f}, CIDEr {cider:.3f}"
        f"{backdoor}; report: {ctx.out / 'report.html'}"
    )
    return 0
