"""Data poisoning for backdoor attacks on captioners: object region sources and image triggers."""

from __future__ import annotations

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
