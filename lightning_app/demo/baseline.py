"""The demo's first stages: the shapes data and the tiny ViT-GPT2 baseline, with its report section."""

from __future__ import annotations

import lightning as L

from callbacks.image_grid import caption_grid_png, figure_png, pyplot
from datamodules.datamodule import CaptionDataModule
from datamodules.shapes import ShapesConfig, generate_shapes, shapes_ready
from lightning_app.demo.context import DemoContext
from lightning_app.training import TrainedCaptioner, read_metrics, train_captioner
from modules.captioning import CaptioningModule

__all__ = ["stage_baseline", "stage_data", "training_curves_png"]


def stage_data(ctx: DemoContext) -> None:
    """Create the shapes data if missing and set up the data module."""
    config = ShapesConfig(seed=ctx.seed, **ctx.shapes)
    if not shapes_ready(ctx.data_root, config):
        print(f"[demo] writing the shapes dataset to {ctx.data_root}")
        generate_shapes(ctx.data_root, config, progress=True)
    datamodule = CaptionDataModule(
        format="coco", root=str(ctx.data_root), image_size=config.image_size, batch_size=ctx.baseline.batch_size
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    ctx.state["datamodule"] = datamodule
    ctx.results["dataset"] = {**datamodule.describe(), "name": "shapes", "seed": ctx.seed}


def stage_baseline(ctx: DemoContext) -> None:
    """Train, test and report the tiny ViT-GPT2 baseline."""
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    s = ctx.baseline
    L.seed_everything(ctx.seed, workers=True)
    module = CaptioningModule.with_tokenizer(
        datamodule.tokenizer,
        captioner={"class_path": "vit_gpt2", "init_args": {"preset": "tiny"}},
        image_size=datamodule.image_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
    )
    print(f"[demo] training the tiny ViT-GPT2 baseline for {s.epochs} epochs")
    run = train_captioner(datamodule, module, ctx.out, "baseline", max_epochs=s.epochs, wandb=ctx.wandb)
    ctx.state["baseline"] = run
    ctx.results["baseline"] = {
        "test": {k: run.test[k] for k in sorted(run.test)},
        "val": {k: v for k, v in sorted(run.val.items()) if k.startswith("bleu")},
        "train_seconds": round(run.train_seconds, 1),
        "checkpoint": str(run.checkpoint),
        "epochs": s.epochs,
        "model": "vit_gpt2/tiny",
        "trainable_params": sum(p.numel() for p in run.module.parameters() if p.requires_grad),
    }
    _report_baseline(ctx, run, datamodule)


def _report_baseline(ctx: DemoContext, run: TrainedCaptioner, datamodule: CaptionDataModule) -> None:
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
    plt = pyplot()
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
    return figure_png(fig)
