"""Data poisoning for backdoor attacks on captioners: region sources, triggers and poisoned splits."""

from __future__ import annotations

from datamodules.poisoning.config import DEFAULT_TARGET_CAPTION, PoisonConfig
from datamodules.poisoning.poisoned import PoisonedSplit, check_cache_outside, poison_split, poisoned_image_id
from datamodules.poisoning.regions import (
    DETECTOR_ARCHS,
    REGION_SOURCES,
    AnnotationRegions,
    DetectorRegions,
    RegionSource,
    build_region_source,
)
from datamodules.poisoning.triggers import (
    TRIGGER_NAMES,
    BadNets,
    Blend,
    ObjectNoise,
    Trigger,
    build_trigger,
    scale_boxes,
)

__all__ = [
    "DEFAULT_TARGET_CAPTION",
    "PoisonConfig",
    "PoisonedSplit",
    "check_cache_outside",
    "poison_split",
    "poisoned_image_id",
    "DETECTOR_ARCHS",
    "REGION_SOURCES",
    "TRIGGER_NAMES",
    "AnnotationRegions",
    "BadNets",
    "Blend",
    "DetectorRegions",
    "ObjectNoise",
    "RegionSource",
    "Trigger",
    "build_region_source",
    "build_trigger",
    "scale_boxes",
]
