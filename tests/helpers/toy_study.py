"""A toy study in one file: all that adding a study takes, with one YAML (tests/fixtures/toy_study.yaml).

It captions the first test images of ``--data.*`` with a trained checkpoint and reports their corpus BLEU. Defining
the :class:`~lightning_app.studies.base.Study` subclass registers it, so importing this file makes it
``robucap study toy``; nothing else in robucap names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.studies.base import Study, StudyData
from modules.captioning import CaptioningModule
from modules.captions import caption_batches
from modules.evaluation import bleu_of, evaluation_loader
from modules.records import CaptionedImage, records_to_json


@dataclass
class ToyStudySettings:
    """Settings of the toy study."""

    ckpt: str
    """Checkpoint written by robucap fit."""
    images: int = 8
    """Caption the first N test images."""
    batch_size: int = 4
    """Images captioned together."""

    def __post_init__(self) -> None:
        for name in ("images", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RobucapError(f"toy study {name} must be an integer >= 1, got {value!r}")


@dataclass
class ToyOutcome:
    """What the toy study found.

    Attributes:
        records: One captioned image per test image, in split order.
        bleu: Corpus BLEU-1..4 of the records.
    """

    records: list[CaptionedImage]
    bleu: dict[str, float]


class ToyStudy(Study[ToyStudySettings, ToyOutcome]):
    """Caption the first test images with a checkpoint and score them."""

    name = "toy"
    help = "Caption the first test images with a checkpoint and report BLEU (the tests' toy study)."
    settings_type = ToyStudySettings

    def run(self, settings: ToyStudySettings, data: StudyData, out: Path) -> ToyOutcome:
        """Load the checkpoint and the test split, caption, score."""
        if not Path(settings.ckpt).is_file():
            raise RobucapError(f"--study.ckpt {settings.ckpt}: no such checkpoint file")
        module = CaptioningModule.load_from_checkpoint(settings.ckpt, map_location="cpu", weights_only=True)
        datamodule = CaptionDataModule(**data.module_options(), progress=False)
        datamodule.tokenizer = module.tokenizer  # the checkpoint's vocabulary, not one fitted to the data
        loader = evaluation_loader(module, datamodule.eval_dataset("test"), settings.images, settings.batch_size)
        records = caption_batches(module, loader)
        return ToyOutcome(records, bleu_of(records))

    def report(self, outcome: ToyOutcome, report: Report) -> None:
        """A BLEU table and the first captions."""
        report.heading("Clean captions of the test images")
        report.table(["images", *outcome.bleu], [[len(outcome.records), *outcome.bleu.values()]])
        report.table(["image", "caption"], [[r.image_id, r.prediction] for r in outcome.records[:4]])

    def results(self, outcome: ToyOutcome) -> dict[str, Any]:
        """``toy``: the image count, BLEU-1..4 and the records."""
        return {"toy": {"n": len(outcome.records), **outcome.bleu, "records": records_to_json(outcome.records)}}

    def summary(self, results: dict[str, Any]) -> str:
        """``N images, BLEU-4 x``."""
        return f"{results['toy']['n']} images, BLEU-4 {results['toy']['bleu4']:.3f}"
