"""The demo's study stages: the freeze, backdoor and transfer studies on the demo's data."""

from __future__ import annotations

from dataclasses import replace

from datamodules.datamodule import CaptionDataModule
from lightning_app.demo.context import DemoContext
from lightning_app.training import TrainedCaptioner

__all__ = ["stage_backdoor_study", "stage_dense_study", "stage_freeze_study", "stage_transfer_study"]


def stage_freeze_study(ctx: DemoContext) -> None:
    """Rashid & Rivas's (2024) five phases on the demo's data, in the regime of ``freeze.start``.

    ``pretrained`` (the quick, smoke and full profiles): every phase starts from a ViT and a GPT-2 the study pretrains
    on the demo's shapes data, joined by new cross-attention. ``baseline``: phases 2-5 fine-tune the demo's baseline.
    """
    from lightning_app.studies.freeze import run_and_report

    cfg = replace(ctx.freeze, seed=ctx.seed, wandb=ctx.wandb)
    start: dict[str, object] = {}
    if cfg.start == "baseline":  # the pretrained regime trains its own baseline from the parts
        base: TrainedCaptioner = ctx.state["baseline"]
        start = {
            "baseline": base.module,
            "baseline_checkpoint": base.checkpoint,
            "baseline_seconds": base.train_seconds,
        }
    ctx.results["freeze_study"] = run_and_report(
        ctx.state["datamodule"], ctx.out / "freeze_study", cfg, ctx.report, **start
    )


def stage_backdoor_study(ctx: DemoContext) -> None:
    """Li et al.'s (2022) benign / BadNets / object-noise models on the demo's data."""
    from lightning_app.studies.backdoor import run_and_report

    cfg = replace(ctx.backdoor, wandb=ctx.wandb, cache_dir=str(ctx.out / "poison_cache"))
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    data = {"format": "coco", "root": str(ctx.data_root), "image_size": datamodule.image_size}
    ctx.results["backdoor_study"] = run_and_report(data, ctx.out / "backdoor_study", cfg, ctx.report)


def stage_transfer_study(ctx: DemoContext) -> None:
    """Transfer matrices and leave-one-out ensembles (Show-and-Fool; Liu et al. 2017) over ``transfer.models``: three
    captioners on the quick and smoke profiles, the study's five by default."""
    from lightning_app.studies.transfer import run_and_report

    cfg = replace(ctx.transfer, seed=ctx.seed, wandb=ctx.wandb)
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    data = {"format": "coco", "root": str(ctx.data_root), "image_size": datamodule.image_size}
    block = run_and_report(data, ctx.out / "transfer_study", cfg, ctx.report)
    ctx.results["transfer"] = block["transfer"]
    ctx.results["ensemble"] = block["ensemble"]
    ctx.results["transfer_study"] = {k: v for k, v in block.items() if k not in ("transfer", "ensemble")}


def stage_dense_study(ctx: DemoContext) -> None:
    """DAG (Xie et al. 2017) on a detector and a segmenter trained here, transfer, and into the demo's baseline."""
    from lightning_app.studies.dense import run_and_report

    cfg = replace(ctx.dense, seed=ctx.seed, wandb=ctx.wandb, checkpoints={})
    datamodule: CaptionDataModule = ctx.state["datamodule"]
    data = {"format": "coco", "root": str(ctx.data_root), "image_size": datamodule.image_size}
    base: TrainedCaptioner = ctx.state["baseline"]
    block = run_and_report(data, ctx.out / "dense_study", cfg, ctx.report, captioner=base.module)
    ctx.results["dense"] = block["dense"]
    ctx.results["dense_study"] = {k: v for k, v in block.items() if k != "dense"}
