"""``robucap study NAME --out DIR``: studies that reproduce the papers' tables in one command."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.inputs import shapes_root_for
from lightning_app.report import Report
from lightning_app.stages import StageRecord, run_stages

STUDIES = ("freeze", "backdoor", "transfer")


def study_main(argv: list[str]) -> int:
    """Parse ``robucap study`` arguments and run one study."""
    parser = argparse.ArgumentParser(prog="robucap study", description="Run a study and write results + report.")
    parser.add_argument("name", help=f"one of {', '.join(STUDIES)}")
    parser.add_argument("--out", required=True, help="output directory (results.json, report.html, logs)")
    parser.add_argument("--profile", default="full", help="full (default), quick or smoke")
    parser.add_argument("--data-format", default="shapes", help="dataset format (default: the built-in shapes)")
    parser.add_argument(
        "--data-root", default=None,
        help="dataset directory (shapes: created if missing; default data/shapes, or data/shapes_<settings> for "
        "shapes made with other settings, so a dataset made with other settings is never in the way)",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None, help="seed (freeze: 0, backdoor: 2021, transfer: 0)")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    freeze = parser.add_argument_group("freeze study")
    freeze.add_argument("--epsilon", type=float, default=None, help="FGSM budget in [0, 1] pixel units")
    freeze.add_argument("--trials", type=int, default=None, help="seeds for the freeze phases")
    backdoor = parser.add_argument_group("backdoor study")
    backdoor.add_argument("--arch", default=None, help="victim captioner: show_attend_tell (default) or vit_gpt2")
    backdoor.add_argument("--epochs", type=int, default=None, help="training epochs per model (also transfer)")
    backdoor.add_argument("--rate", type=float, default=None, help="poisoning rate in [0, 1] (default 0.3)")
    backdoor.add_argument("--alpha", type=float, default=None, help="object-noise intensity in [0, 1] (20/255)")
    backdoor.add_argument("--target", default=None, help="target caption (default 'you are under attack')")
    backdoor.add_argument("--cache-dir", default=None, help="poisoned-image cache (default .cache/poison)")
    transfer = parser.add_argument_group("transfer study")
    transfer.add_argument(
        "--checkpoints", nargs="+", default=None, metavar="CKPT",
        help="study these robucap checkpoints (at least 3) instead of training the three default captioners",
    )  # fmt: skip
    transfer.add_argument("--images", type=int, default=None, help="test images attacked (full 50, quick 16)")
    args = parser.parse_args(argv)
    if args.name not in STUDIES:
        raise RobucapError(f"unknown study {args.name!r}; expected one of {list(STUDIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shapes = {"n_train": 48, "n_val": 8, "n_test": 8} if args.profile == "smoke" else {}
    if args.data_root is None:
        args.data_root = default_data_root(args, shapes)
    report = Report(f"robucap study {args.name}")
    results: dict[str, Any] = {}
    records: dict[str, StageRecord] = {}
    lines: list[str] = []
    study = {"freeze": _freeze, "backdoor": _backdoor, "transfer": _transfer}[args.name]

    def run() -> None:
        block, line = study(args, out, shapes, report)
        results.update(block)
        lines.append(line)

    def write() -> None:
        # Also after a failed stage: what the study has so far, and which stage failed.
        results["seconds"] = round(time.perf_counter() - start, 1)
        results["report"] = str(out / "report.html")
        results["stages"] = {name: record.to_json() for name, record in records.items()}
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
        report.write(out / "report.html")

    run_stages("study", [(args.name, run)], records, write)
    print(f"robucap study {args.name} done in {results['seconds']:.0f} s: {lines[0]}; report: {out / 'report.html'}")
    return 0


def default_data_root(args: argparse.Namespace, shapes: dict[str, Any]) -> str:
    """``data/shapes`` for the default shapes data, else a folder named after the settings that differ.

    The shapes generator never rewrites a dataset made with other settings (it refuses), so a study whose profile,
    seed or image size asks for other shapes data gets its own folder instead of an error about the shared one.
    """
    if args.data_format != "shapes":
        raise RobucapError(f"--data-format {args.data_format} needs --data-root (the dataset directory)")
    # The freeze study generates its shapes data with its own seed; the others use the data of seed 0.
    seed = args.seed if args.name == "freeze" and args.seed is not None else 0
    return shapes_root_for(smoke=bool(shapes), seed=seed, image_size=args.image_size)


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """Options the user set, renamed to config fields."""
    return {field: getattr(args, arg) for field, arg in names.items() if getattr(args, arg) is not None}


def _freeze(args: argparse.Namespace, out: Path, shapes: dict[str, Any], report: Report) -> tuple[dict, str]:
    from lightning_app.studies.freeze import run_and_report, study_settings

    seed = 0 if args.seed is None else args.seed
    cfg = study_settings(args.profile, seed=seed, wandb=not args.no_wandb, **_given(args, epsilon="epsilon",
                         trials="trials"))  # fmt: skip
    datamodule = CaptionDataModule(
        format=args.data_format, root=args.data_root, image_size=args.image_size, batch_size=cfg.batch_size,
        shapes={**shapes, "seed": seed},
    )  # fmt: skip
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    block = run_and_report(datamodule, out, cfg, report)
    rows = {r["name"]: r for r in block["rows"]}
    line = (
        f"test BLEU-4 clean/FGSM baseline {rows['baseline']['test']['clean']['bleu4']:.3f}/"
        f"{rows['baseline']['test']['adversarial']['bleu4']:.3f}, adversarial training "
        f"{rows['adversarial_training']['test']['clean']['bleu4']:.3f}/"
        f"{rows['adversarial_training']['test']['adversarial']['bleu4']:.3f}"
    )
    return {"dataset": {**datamodule.describe(), "name": args.data_format}, "freeze_study": block}, line


def _backdoor(args: argparse.Namespace, out: Path, shapes: dict[str, Any], report: Report) -> tuple[dict, str]:
    from lightning_app.studies.backdoor import run_and_report, study_settings, summary

    overrides = _given(args, seed="seed", arch="arch", epochs="epochs", rate="rate", alpha="alpha",
                       target_caption="target", cache_dir="cache_dir")  # fmt: skip
    cfg = study_settings(args.profile, wandb=not args.no_wandb, **overrides)
    data = {
        "format": args.data_format,
        "root": args.data_root,
        "image_size": args.image_size,
        # The shapes data itself is fixed (seed 0); cfg.seed drives poisoning and training.
        "shapes": shapes,
    }
    block = run_and_report(data, out, cfg, report)
    return {"dataset": {**data, "poison": block["dataset"]}, "backdoor_study": block}, summary(block)


def _transfer(args: argparse.Namespace, out: Path, shapes: dict[str, Any], report: Report) -> tuple[dict, str]:
    from lightning_app.studies.transfer import run_and_report, study_settings, summary

    overrides = _given(args, seed="seed", epochs="epochs", images="images", checkpoints="checkpoints")
    cfg = study_settings(args.profile, wandb=not args.no_wandb, **overrides)
    data = {"format": args.data_format, "root": args.data_root, "image_size": args.image_size, "shapes": shapes}
    block = run_and_report(data, out, cfg, report)
    return block, summary(block)
