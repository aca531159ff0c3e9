"""``robucap study NAME --out DIR``: studies that reproduce the papers' tables in one command."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report

STUDIES = ("freeze",)


def study_main(argv: list[str]) -> int:
    """Parse ``robucap study`` arguments and run one study."""
    parser = argparse.ArgumentParser(prog="robucap study", description="Run a study and write results + report.")
    parser.add_argument("name", help=f"one of {', '.join(STUDIES)}")
    parser.add_argument("--out", required=True, help="output directory (results.json, report.html, logs)")
    parser.add_argument("--profile", default="full", help="full (default), quick or smoke")
    parser.add_argument("--data-format", default="shapes", help="dataset format (default: the built-in shapes)")
    parser.add_argument("--data-root", default="data/shapes", help="dataset directory (shapes: created if missing)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=None, help="FGSM budget in [0, 1] pixel units")
    parser.add_argument("--trials", type=int, default=None, help="seeds for the freeze phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    args = parser.parse_args(argv)
    if args.name not in STUDIES:
        raise RobucapError(f"unknown study {args.name!r}; expected one of {list(STUDIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from lightning_app.studies.freeze import run_and_report, study_settings

    overrides = {k: v for k, v in {"epsilon": args.epsilon, "trials": args.trials}.items() if v is not None}
    cfg = study_settings(args.profile, seed=args.seed, wandb=not args.no_wandb, **overrides)
    shapes = {"n_train": 48, "n_val": 8, "n_test": 8} if args.profile == "smoke" else {}
    datamodule = CaptionDataModule(
        format=args.data_format, root=args.data_root, image_size=args.image_size, batch_size=cfg.batch_size,
        shapes={**shapes, "seed": args.seed},
    )  # fmt: skip
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    report = Report(f"robucap study {args.name}")
    block = run_and_report(datamodule, out, cfg, report)
    results = {"dataset": {**datamodule.describe(), "name": args.data_format}, "freeze_study": block}
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["report"] = str(out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
    report.write(out / "report.html")
    rows = {r["name"]: r for r in block["rows"]}
    print(
        f"robucap study freeze done in {results['seconds']:.0f} s: test BLEU-4 clean/FGSM baseline "
        f"{rows['baseline']['test']['clean']['bleu4']:.3f}/{rows['baseline']['test']['adversarial']['bleu4']:.3f}, "
        f"adversarial training {rows['adversarial_training']['test']['clean']['bleu4']:.3f}/"
        f"{rows['adversarial_training']['test']['adversarial']['bleu4']:.3f}; report: {out / 'report.html'}"
    )
    return 0
