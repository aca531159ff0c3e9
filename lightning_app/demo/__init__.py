"""``robucap demo --out DIR``: the main job on the embedded default (shapes data, tiny ViT-GPT2, CPU).

The demo is a list of stages sharing one :class:`DemoContext`. Each stage adds keys to ``ctx.results`` and sections
to ``ctx.report``; later capabilities plug in with :func:`register_stage`. Each stage's outcome is recorded under
``stages`` in ``results.json``; a stage that fails stops the demo after what it has is written
(:func:`lightning_app.stages.run_stages`). Settings come from ``configs/demo/<profile>.yaml`` (``--profile quick``
by default, or ``--config FILE``) and dotted flags (``--baseline.epochs 5``); ``results.json`` records them under
``settings``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lightning_app.demo.baseline import stage_baseline, stage_data, training_curves_png
from lightning_app.demo.context import BaselineSettings, DemoContext, DemoStage, ShowAndFoolSettings
from lightning_app.demo.show_and_fool import SHOW_AND_FOOL_MODES, ModeTargets, mode_targets, stage_show_and_fool
from lightning_app.demo.studies import (
    stage_backdoor_study,
    stage_dense_study,
    stage_freeze_study,
    stage_transfer_study,
)
from lightning_app.inputs import shapes_root_for
from lightning_app.report import Report
from lightning_app.settings_parser import CONFIGS_DIR, expand_profile, new_parser, parse, settings_block
from lightning_app.stages import StageRecord, run_stages
from lightning_app.studies.backdoor import BackdoorStudyConfig
from lightning_app.studies.dense import DenseStudyConfig
from lightning_app.studies.freeze import FreezeStudyConfig
from lightning_app.studies.transfer import TransferStudyConfig

__all__ = [
    "DEMO_CONFIGS",
    "SHOW_AND_FOOL_MODES",
    "STAGES",
    "DemoContext",
    "DemoStage",
    "ModeTargets",
    "demo_main",
    "demo_parser",
    "mode_targets",
    "register_stage",
    "run_demo",
    "training_curves_png",
]

DEMO_CONFIGS = CONFIGS_DIR / "demo"
STAGES: list[tuple[str, DemoStage]] = []


def register_stage(name: str, stage: DemoStage) -> None:
    """Append a stage to the demo (stages run in registration order; a name registered again is moved last)."""
    STAGES[:] = [(n, s) for n, s in STAGES if n != name] + [(name, stage)]


register_stage("data", stage_data)
register_stage("baseline", stage_baseline)
register_stage("freeze_study", stage_freeze_study)
register_stage("backdoor_study", stage_backdoor_study)
register_stage("show_and_fool", stage_show_and_fool)
register_stage("transfer_study", stage_transfer_study)
register_stage("dense_study", stage_dense_study)


def run_demo(ctx: DemoContext) -> DemoContext:
    """Run every registered stage, then write ``results.json`` and ``report.html`` into ``ctx.out``.

    Raises:
        RobucapError: A stage failed on bad input (``demo stage '<name>' failed: ...``), after the results of the
            stages before it were written.
        Exception: Any other exception of a stage, unchanged, after the same writing.
    """
    ctx.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def write() -> None:
        ctx.results["profile"] = ctx.profile
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


def demo_parser() -> ArgumentParser:
    """The parser of ``robucap demo``: output, data folder, seed, and each stage's settings."""
    parser = new_parser("robucap demo", "Train, test and report on the shapes data.")
    parser.add_argument("--out", type=str, default="runs/demo", help="output directory")
    parser.add_argument(
        "--data", type=str | None, default=None,
        help="shapes data directory, created if missing (default data/shapes; data/shapes_smoke, data/shapes_seedN for "
        "the smoke profile or another seed, whose data differ: an existing dataset is never rewritten)",
    )  # fmt: skip
    parser.add_argument("--name", type=str, default="quick", help="name of these settings (results.json: profile)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the baseline and the studies")
    parser.add_argument("--wandb", type=bool, default=True, help="log every run to W&B (offline without a key)")
    parser.add_argument("--shapes", type=dict[str, int], default={}, help="shapes generator settings that differ")
    parser.add_class_arguments(BaselineSettings, "baseline", help="the tiny ViT-GPT2 baseline")
    parser.add_class_arguments(ShowAndFoolSettings, "show_and_fool", help="the Show-and-Fool stage")
    # The studies' seed and wandb follow the demo's (--seed, --wandb): skipped here so that no option is ignored.
    parser.add_class_arguments(FreezeStudyConfig, "freeze", skip={"seed", "wandb"}, help="the freeze study stage")
    parser.add_class_arguments(
        BackdoorStudyConfig, "backdoor", skip={"wandb", "cache_dir"}, help="the backdoor study stage"
    )
    parser.add_class_arguments(TransferStudyConfig, "transfer", skip={"seed", "wandb"}, help="the transfer study")
    parser.add_class_arguments(
        DenseStudyConfig, "dense", skip={"seed", "wandb", "checkpoints"}, help="the dense study (DAG) stage"
    )
    return parser


def demo_main(argv: list[str]) -> int:
    """``robucap demo`` argument parsing; the quick profile unless ``--profile`` or ``--config`` says otherwise."""
    given = any(a in ("--profile", "--config") or a.startswith(("--profile=", "--config=")) for a in argv)
    argv = expand_profile(argv if given else ["--profile", "quick", *argv], DEMO_CONFIGS, "")
    parser = demo_parser()
    config = parse(parser, argv)
    settings = settings_block(parser, config)
    objects = parser.instantiate(config)
    data = config.data or shapes_root_for(smoke=bool(config.shapes), seed=config.seed)
    ctx = DemoContext(
        out=Path(config.out), data_root=Path(data), profile=config.name, seed=config.seed, wandb=config.wandb,
        shapes=dict(config.shapes), baseline=objects.baseline, show_and_fool=objects.show_and_fool,
        freeze=objects.freeze, backdoor=objects.backdoor, transfer=objects.transfer, dense=objects.dense,
    )  # fmt: skip
    ctx.results["settings"] = settings
    run_demo(ctx)
    print(_summary(ctx.results, ctx.out))
    return 0


def _summary(results: dict[str, Any], out: Path) -> str:
    test = results.get("baseline", {}).get("test", {})
    bleu4, cider = test.get("bleu4", float("nan")), test.get("cider", float("nan"))
    backdoor = ""
    if "backdoor_study" in results:
        from lightning_app.studies.backdoor import summary

        backdoor = f"; backdoor: {summary(results['backdoor_study'])}"
    return (
        f"robucap demo done in {results['seconds']:.0f} s: baseline test BLEU-4 {bleu4:.3f}, CIDEr {cider:.3f}"
        f"{backdoor}; report: {out / 'report.html'}"
    )
