"""Learning-rate schedules."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to ``min_ratio``.

    Args:
        step: Optimizer step (0-based).
        warmup_steps: Steps of linear warm-up from ~0 to 1.
        total_steps: Total optimizer steps of the run.
        min_ratio: Final multiplier after the decay.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up, then a constant learning rate (``total_steps`` and ``min_ratio`` unused)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


SCHEDULES = {"cosine": warmup_cosine, "constant": warmup_constant}
