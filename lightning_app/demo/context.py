"""The demo's settings (``configs/demo/<profile>.yaml``) and the state its stages share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.errors import RobucapError
from lightning_app.report import Report
from lightning_app.stages import StageRecord
from lightning_app.studies.backdoor import BackdoorStudyConfig
from lightning_app.studies.dense import DenseStudyConfig
from lightning_app.studies.freeze import FreezeStudyConfig
from lightning_app.studies.transfer import TransferStudyConfig

__all__ = ["BaselineSettings", "DemoContext", "DemoStage", "ShowAndFoolSettings"]


@dataclass
class BaselineSettings:
    """The tiny ViT-GPT2 baseline the demo trains (``--baseline.*``)."""

    epochs: int = 3
    """Training epochs."""
    batch_size: int = 64
    """Training batch size (also the data module's)."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warm-up steps."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise RobucapError("baseline.epochs and baseline.batch_size must be >= 1, baseline.warmup_steps >= 0")


@dataclass
class ShowAndFoolSettings:
    """The demo's Show-and-Fool stage (``--show_and_fool.*``).

    The paper's 1000 iterations x 5 rounds take minutes per image batch on a CPU, so the quick profile runs fewer
    (the full attack is ``robucap attack show-and-fool``, see docs/attacks.md).
    """

    images: int = 16
    """Test images attacked (the first N)."""
    iterations: int = 300
    """Adam iterations per round of the c search (Show-and-Fool, Chen et al. 2018: 1000)."""
    rounds: int = 3
    """Rounds of the c search (Show-and-Fool, Chen et al. 2018: 5)."""
    targets: str = "paper"
    """``paper``: each image's target is another image's clean caption (Show-and-Fool, Chen et al. 2018);
    ``references``: one fixed target from the reference captions, for a barely trained baseline that captions every
    image alike (the smoke profile)."""

    def __post_init__(self) -> None:
        if self.targets not in ("paper", "references"):
            raise RobucapError(f"show_and_fool.targets must be 'paper' or 'references', got {self.targets!r}")
        if min(self.images, self.iterations, self.rounds) < 1:
            raise RobucapError("show_and_fool.images, .iterations and .rounds must be >= 1")


@dataclass
class DemoContext:
    """State shared by demo stages.

    Attributes:
        out: Output directory (``results.json``, ``report.html``, logs, checkpoints).
        data_root: Where the shapes data lives (created if missing).
        profile: Name of the settings (``quick``, ``full``, ``smoke``), recorded as ``profile``.
        seed: Global seed (the data, the baseline, the freeze and transfer studies).
        wandb: Log runs to W&B (offline without an API key).
        shapes: Shapes generator settings that differ from its defaults.
        baseline: The baseline's training settings.
        show_and_fool: The Show-and-Fool stage's settings.
        freeze: The freeze study's settings (its seed and wandb follow the demo's).
        backdoor: The backdoor study's settings (its wandb follows the demo's; poisoned images go under ``out``).
        transfer: The transfer study's settings (its seed and wandb follow the demo's).
        dense: The dense study's settings (its seed and wandb follow the demo's; the captioner is the baseline).
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
    shapes: dict[str, int] = field(default_factory=dict)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    show_and_fool: ShowAndFoolSettings = field(default_factory=ShowAndFoolSettings)
    freeze: FreezeStudyConfig = field(default_factory=FreezeStudyConfig)
    backdoor: BackdoorStudyConfig = field(default_factory=BackdoorStudyConfig)
    transfer: TransferStudyConfig = field(default_factory=TransferStudyConfig)
    dense: DenseStudyConfig = field(default_factory=DenseStudyConfig)
    results: dict[str, Any] = field(default_factory=dict)
    report: Report = field(default_factory=lambda: Report("robucap demo"))
    state: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)


DemoStage = Callable[[DemoContext], "str | None"]
"""A demo stage: returns ``None`` when it ran, or why it had nothing to do (recorded as ``skipped``)."""
