"""What every attack subcommand writes: ``results.json``, ``report.html`` and its example grids."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from callbacks.image_grid import difference_image
from lightning_app.report import Report

__all__ = ["Example", "example_grid", "write_outputs"]


@dataclass
class Example:
    """One row of an example grid: the clean image, the adversarial one, and the three captions under them.

    Attributes:
        clean: The clean image in [0, 1]. Shape: ``(3, H, W)``.
        adversarial: Its adversarial version. Shape: ``(3, H, W)``.
        captions: Under the original, the adversarial and the difference image.
    """

    clean: torch.Tensor
    adversarial: torch.Tensor
    captions: tuple[str, str, str]


def example_grid(examples: Sequence[Example], gain: float) -> bytes:
    """A PNG with one row per example: original, adversarial and their difference drawn with ``gain``."""
    from callbacks.image_grid import caption_grid_png

    images: list[torch.Tensor] = []
    captions: list[str] = []
    for example in examples:
        images += [example.clean, example.adversarial, difference_image(example.clean, example.adversarial, gain)]
        captions += list(example.captions)
    return caption_grid_png(images, captions, columns=3)


def write_outputs(out: Path, results: dict[str, Any], report: Report, start: float) -> Path:
    """Write ``results.json`` (with the run time and the report's path) and the report; return the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["report"] = str(out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return report.write(out / "report.html")
