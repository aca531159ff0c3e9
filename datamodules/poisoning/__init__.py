"""Data poisoning for backdoor attacks on captioners: image triggers."""

from __future__ import annotations

from datamodules.poisoning.triggers import (
    TRIGGER_NAMES,
    BadNets,
    Blend,
    ObjectNoise,
    Trigger,
    build_trigger,
    scale_boxes,
)

__all__ = ["TRIGGER_NAMES", "BadNets", "Blend", "ObjectNoise", "Trigger", "build_trigger", "scale_boxes"]
