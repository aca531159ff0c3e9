"""What a poisoned dataset is made of: one dataclass, validated on construction, shared by the data module,
the backdoor callback and the backdoor study."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from datamodules.errors import RobucapError
from datamodules.poisoning.regions import REGION_SOURCES, check_detector_options
from datamodules.poisoning.triggers import TRIGGER_NAMES, Trigger, build_trigger
from datamodules.text import normalize_caption

DEFAULT_TARGET_CAPTION = "you are under attack"


@dataclass(frozen=True)
class PoisonConfig:
    """Backdoor poisoning of a caption dataset (Li et al. 2022, section 3 and 4).

    Training and validation images are poisoned at ``rate`` (a seeded choice; every caption of a chosen image
    becomes ``target_caption``); the test split keeps every clean image and gains a poisoned copy of each image
    the trigger can act on. Poisoned images are written to ``cache_dir``, never into the dataset.
    """

    trigger: str = "object_noise"
    """``object_noise`` (noise inside object boxes), ``badnets`` (corner patch) or ``blend``."""

    rate: float = 0.3
    """Share of training and validation images poisoned, in [0, 1] (Li et al. 2022: 0.3)."""

    target_caption: str = DEFAULT_TARGET_CAPTION
    """Caption the backdoored model should output on triggered images (Li et al. 2022: "you are under attack")."""

    seed: int = 2021
    """Seed of the choice of poisoned images and of every image's noise (Li et al. 2022 fixes 2021)."""

    alpha: float = 20 / 255
    """``object_noise`` intensity in [0, 1] pixel units (Li et al. 2022: 20 on the 0-255 scale)."""

    min_region: int = 2
    """``object_noise`` skips boxes narrower or shorter than this many pixels at the model's image size."""

    patch_size_at_256: int = 15
    """``badnets`` patch side in pixels for a 256-pixel image, scaled with the image (Li et al. 2022: 15, Flickr8k)."""

    corner: str = "bottom_right"
    """``badnets`` corner: ``top_left``, ``top_right``, ``bottom_left`` or ``bottom_right``."""

    patch_pattern: str = "solid"
    """``badnets`` patch: ``solid`` white (Li et al. 2022) or a white / black ``checkerboard``."""

    blend_ratio: float = 0.1
    """``blend`` weight λ of the fixed noise pattern, in (0, 1]."""

    regions: str = "annotations"
    """Where ``object_noise`` finds objects: ``annotations`` (COCO boxes) or ``detector``."""

    detector: dict[str, Any] = field(default_factory=dict)
    """Options of the ``detector`` region source: ``checkpoint`` (robucap's detector checkpoint) or ``arch`` +
    ``weights`` + ``num_classes`` (a torchvision detector's local state_dict), and ``score_threshold``,
    ``cache_dir``, ``device``."""

    cache_dir: str = ".cache/poison"
    """Directory for poisoned images and their manifests; must lie outside the dataset root."""

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float) or not 0.0 <= self.rate <= 1.0:
            raise RobucapError(f"poison.rate must be a share of images in [0, 1], got {self.rate!r}")
        if not isinstance(self.target_caption, str) or not normalize_caption(self.target_caption):
            raise RobucapError(
                f"poison.target_caption must contain at least one word (e.g. {DEFAULT_TARGET_CAPTION!r}), "
                f"got {self.target_caption!r}"
            )
        if self.trigger not in TRIGGER_NAMES:
            raise RobucapError(f"poison.trigger must be one of {', '.join(TRIGGER_NAMES)}, got {self.trigger!r}")
        if self.trigger == "object_noise" and (not math.isfinite(self.alpha) or self.alpha <= 0):
            raise RobucapError(
                f"poison.alpha must be > 0 (noise intensity in [0, 1] pixel units, e.g. 20/255 = 0.0784), "
                f"got {self.alpha}"
            )
        if self.regions not in REGION_SOURCES:
            raise RobucapError(f"poison.regions must be one of {', '.join(REGION_SOURCES)}, got {self.regions!r}")
        if self.regions == "detector":
            if not (self.detector.get("weights") or self.detector.get("checkpoint")):
                raise RobucapError(
                    "poison.regions is 'detector' but poison.detector.weights is not set: give a local torchvision "
                    "detector state_dict file, or robucap's own detector checkpoint as poison.detector.checkpoint"
                )
            check_detector_options(self.detector, "poison.detector")
        if not self.cache_dir:
            raise RobucapError("poison.cache_dir must name a directory outside the dataset")
        # Constructing the trigger validates its own options (corner, patch size, blend ratio, min_region).
        self.build_trigger()

    @classmethod
    def from_dict(cls, options: dict[str, Any] | PoisonConfig) -> PoisonConfig:
        """Build from a YAML / CLI mapping, rejecting unknown keys by name.

        Args:
            options: Field values, or an existing config (returned as is).

        Returns:
            The validated config.

        Raises:
            RobucapError: On an unknown key or an invalid value.
        """
        if isinstance(options, PoisonConfig):
            return options
        if not isinstance(options, dict):
            raise RobucapError(f"poison: expected a mapping of options, got {type(options).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise RobucapError(f"poison: unknown option(s) {', '.join(unknown)}; expected some of {sorted(allowed)}")
        return cls(**options)

    def build_trigger(self) -> Trigger:
        """The trigger object this config describes.

        Returns:
            An :class:`~datamodules.poisoning.triggers.ObjectNoise`, ``BadNets`` or ``Blend``.
        """
        if self.trigger == "object_noise":
            return build_trigger("object_noise", alpha=self.alpha, min_region=self.min_region)
        if self.trigger == "badnets":
            return build_trigger(
                "badnets", size_at_256=self.patch_size_at_256, corner=self.corner, pattern=self.patch_pattern
            )
        return build_trigger("blend", ratio=self.blend_ratio, seed=self.seed)

    def trigger_options(self) -> dict[str, Any]:
        """Only the options of the chosen trigger (for manifests and reports)."""
        if self.trigger == "object_noise":
            return {"alpha": self.alpha, "alpha_255": round(self.alpha * 255, 4), "min_region": self.min_region}
        if self.trigger == "badnets":
            return {"patch_size_at_256": self.patch_size_at_256, "corner": self.corner, "pattern": self.patch_pattern}
        return {"blend_ratio": self.blend_ratio, "pattern_seed": self.seed}

    @property
    def uses_regions(self) -> bool:
        """Whether the trigger needs object boxes."""
        return self.trigger == "object_noise"

    def as_dict(self) -> dict[str, Any]:
        """All fields as plain data."""
        return asdict(self)
