"""Settings of ``robucap study dense`` (``--study.*``) and the roles of its victims."""

from __future__ import annotations

from dataclasses import dataclass, field

from datamodules.errors import RobucapError
from modules.attacks.dag import PAPER_GAMMA
from modules.detection import DETECTOR_ARCHITECTURES
from modules.segmentation import SEGMENTER_ARCHITECTURES

__all__ = ["ROLES", "DenseStudyConfig"]

ROLES = ("detector", "detector_2", "segmenter", "segmenter_2", "captioner")
"""The victims of the study, by role (``--study.checkpoints`` keys)."""


@dataclass
class DenseStudyConfig:
    """Settings of the dense study."""

    victim_image_size: int = 128
    """Input side of the detectors and segmenters, in pixels (the shapes' 64 px images are upsampled)."""
    train_images: int | None = None
    """Training images of every victim (the first N; ``None``: all)."""
    val_images: int | None = 500
    """Validation images for model selection (the first N)."""
    test_images: int | None = 1000
    """Test images each trained victim is scored on (the first N)."""
    images: int = 16
    """Test images attacked: the first N with a ground-truth object."""
    detector_epochs: int = 2
    """Training epochs of each detector."""
    segmenter_epochs: int = 2
    """Training epochs of each segmenter."""
    captioner_epochs: int = 3
    """Training epochs of the captioner."""
    batch_size: int = 16
    """Training batch size of the detectors and segmenters (the captioner: 64)."""
    detector_arch: str = "small"
    """Architecture of both detectors (:data:`~modules.detection.DETECTOR_ARCHITECTURES`)."""
    segmenter_arch: str = "small"
    """Architecture of the source segmenter."""
    transfer_victims: bool = True
    """Also train (or load) ``detector_2`` and ``segmenter_2`` for the transfer across training runs and
    architectures; ``false``: the two sources only (task transfer and the summed perturbation remain)."""
    other_segmenter_arch: str = "lraspp_mobilenet_v3_large"
    """Architecture of ``segmenter_2`` (transfer across architectures; a torchvision builder, random init)."""
    gamma: float = PAPER_GAMMA
    """DAG's step in [0, 1] pixel units (the paper's 0.5 / 255)."""
    detector_iterations: int = 150
    """DAG's ``M_0`` on the detector (the paper: 150)."""
    segmenter_iterations: int = 200
    """DAG's ``M_0`` on the segmenter (the paper: 200)."""
    captioner_iterations: int = 200
    """DAG's ``M_0`` on the captioner's content words."""
    detector_reselect_every: int = 0
    """Select the detector's dense proposals again on the current iterate every N steps (0: the paper's fixed
    proposals of the clean image; beyond the paper, see docs/dense.md)."""
    captioner_dag: bool = True
    """Also run DAG on the captioner itself (``dense.captioner``)."""
    attack_batch_size: int = 16
    """Images attacked (and scored) at once."""
    seed: int = 0
    """Seed of the sources (``detector_2`` trains with ``seed + 1``), the class permutations and the controls."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Existing checkpoints to use instead of training, by role (``detector``, ``detector_2``, ``segmenter``,
    ``segmenter_2``, ``captioner``); roles left out are trained."""
    wandb: bool = True
    """Log every training run to W&B (offline without an API key)."""

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobucapError(f"--study.{name} must be >= 1 or null, got {value}")
        epochs = ("detector_epochs", "segmenter_epochs", "captioner_epochs")
        iterations = ("detector_iterations", "segmenter_iterations", "captioner_iterations")
        for name in ("images", "batch_size", "attack_batch_size", *epochs, *iterations):
            if getattr(self, name) < 1:
                raise RobucapError(f"--study.{name} must be >= 1, got {getattr(self, name)}")
        if self.detector_reselect_every < 0:
            raise RobucapError(f"--study.detector_reselect_every must be >= 0, got {self.detector_reselect_every}")
        if not self.gamma > 0:
            raise RobucapError(f"--study.gamma (DAG's step, [0, 1] pixel units) must be > 0, got {self.gamma}")
        if self.victim_image_size < 16:
            raise RobucapError(f"--study.victim_image_size must be >= 16 pixels, got {self.victim_image_size}")
        if self.detector_arch not in DETECTOR_ARCHITECTURES:
            raise RobucapError(
                f"--study.detector_arch must be one of {', '.join(DETECTOR_ARCHITECTURES)}, got {self.detector_arch!r}"
            )
        for name in ("segmenter_arch", "other_segmenter_arch"):
            if getattr(self, name) not in SEGMENTER_ARCHITECTURES:
                raise RobucapError(
                    f"--study.{name} must be one of {', '.join(SEGMENTER_ARCHITECTURES)}, got {getattr(self, name)!r}"
                )
        if not self.transfer_victims and {"detector_2", "segmenter_2"} & set(self.checkpoints):
            raise RobucapError(
                "--study.checkpoints gives detector_2 or segmenter_2 but --study.transfer_victims is false"
            )
        unknown = sorted(set(self.checkpoints) - set(ROLES))
        if unknown:
            raise RobucapError(f"--study.checkpoints has unknown roles {unknown}; expected some of {', '.join(ROLES)}")
