"""``robucap study NAME --out DIR``: studies that reproduce the papers' tables in one command.

Settings come from ``configs/study/<name>_<profile>.yaml`` (``--profile smoke`` or ``--config FILE``) and dotted
flags (``--study.epsilon 0.1``, ``--data.root DIR``); ``--print_config`` prints them. ``results.json`` records them
under ``settings`` before the study runs, so ``--print_config`` output passed back with ``--config`` reproduces them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.settings_parser import CONFIGS_DIR, expand_profile, new_parser, parse, profiles, settings_block
from lightning_app.stages import StageRecord, run_stages
from lightning_app.studies.base import Study, StudyData, registered_studies

__all__ = ["STUDY_CONFIGS", "available_studies", "load_study", "study_main", "study_parser"]

STUDY_CONFIGS = CONFIGS_DIR / "study"


def available_studies() -> dict[str, Study]:
    """Every registered study by name: those of this package (its files are imported here, so a study added to it
    needs no list) and those of any file imported before (:func:`~lightning_app.studies.base.registered_studies`)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return {name: cls() for name, cls in sorted(registered_studies().items())}


def load_study(name: str) -> Study:
    """The study called ``name``.

    Raises:
        RobucapError: No study has that name.
    """
    studies = available_studies()
    if name not in studies:
        raise RobucapError(f"unknown study {name!r}; expected one of {sorted(studies)}")
    return studies[name]


def study_parser(study: Study) -> ArgumentParser:
    """The parser of ``robucap study <name>``: ``--out``, ``--data.*`` and ``--study.*``."""
    parser = new_parser(f"robucap study {study.name}", f"{study.help} Writes results.json and report.html.")
    parser.add_argument("--out", type=str, required=True, help="output directory (results.json, report.html, logs)")
    parser.add_class_arguments(StudyData, "data", help="the data the study trains and evaluates on")
    parser.add_class_arguments(study.settings_type, "study", help=f"settings of the {study.name} study")
    return parser


def study_main(argv: list[str]) -> int:
    """Parse ``robucap study`` arguments and run one study."""
    studies = available_studies()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: robucap study {" + ",".join(sorted(studies)) + "} --out DIR [--profile NAME] [--config FILE]")
        for name in sorted(studies):
            shipped = ", ".join(profiles(STUDY_CONFIGS, f"{name}_")) or "none shipped; use --config FILE"
            print(f"  {name:<10} {studies[name].help} (profiles: {shipped})")
        return 0
    study = load_study(argv[0])
    parser = study_parser(study)
    config = parse(parser, expand_profile(argv[1:], STUDY_CONFIGS, f"{study.name}_"))
    settings = settings_block(parser, config)
    objects = parser.instantiate(config)  # the dataclasses check their fields here, before anything is written
    return _run(study, objects.study, objects.data, Path(config.out), settings)


def _run(study: Study, settings: Any, data: StudyData, out: Path, block: dict[str, Any]) -> int:
    """Run ``study`` as one stage; write results.json (settings first) and the report, also after a failure."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = Report(f"robucap study {study.name}")
    results: dict[str, Any] = {"settings": block}
    records: dict[str, StageRecord] = {}
    lines: list[str] = []

    def write() -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        results["report"] = str(out / "report.html")
        results["stages"] = {name: record.to_json() for name, record in records.items()}
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
        report.write(out / "report.html")

    def run() -> None:
        outcome = study.run(settings, data, out)
        study.report(outcome, report)
        results.update(study.results(outcome))
        lines.append(study.summary(results))

    write()  # the settings are on disk before the (long) run
    run_stages("study", [(study.name, run)], records, write)
    print(f"robucap study {study.name} done in {results['seconds']:.0f} s: {lines[0]}; report: {out / 'report.html'}")
    return 0
