"""Commands made of stages (``robucap demo``, ``robucap study``): run them in order and record each one's outcome.

A stage that fails stops the command, but only after the command has written what it has (``results.json`` with a
``stages`` block, the report), so a long run that breaks late still leaves its earlier results. A user mistake
(:class:`~datamodules.errors.RobucapError`) then becomes one line naming the stage; any other exception is re-raised
unchanged, so a programming error keeps its traceback instead of passing for bad input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from datamodules.errors import RobucapError

__all__ = ["Stage", "StageRecord", "run_stages"]

StageStatus = Literal["ok", "failed", "skipped"]
Stage = Callable[[], "str | None"]
"""A stage: does its work and returns ``None``, or returns why it had nothing to do (it is then ``skipped``)."""


@dataclass(frozen=True)
class StageRecord:
    """The outcome of one stage, as written under ``stages`` in ``results.json``.

    Attributes:
        status: ``ok`` (it ran), ``failed`` (it raised) or ``skipped`` (it found nothing to do, or an earlier stage
            failed).
        seconds: Wall-clock seconds it ran (0 when it never started).
        error: Why it failed: the exception's type and the first line of its message.
        reason: Why it was skipped.
    """

    status: StageStatus
    seconds: float = 0.0
    error: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record without its empty fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_stages(
    command: str,
    stages: Sequence[tuple[str, Stage]],
    records: dict[str, StageRecord],
    write: Callable[[], None],
) -> None:
    """Run ``stages`` in order, recording each outcome in ``records``, and call ``write`` once at the end.

    Args:
        command: What runs the stages, for the error line (``demo``, ``study``).
        stages: ``(name, stage)`` pairs; later stages may use what earlier ones left behind.
        records: Filled with one :class:`StageRecord` per stage, in run order (stages after a failure are
            ``skipped``).
        write: Writes the command's results and report; called after the last stage, or after a failure.

    Raises:
        RobucapError: A stage raised one (bad input): ``<command> stage '<name>' failed: <message>``.
        Exception: Any other exception a stage raised, unchanged (a bug, not bad input).
    """
    for index, (name, stage) in enumerate(stages):
        start = time.perf_counter()
        try:
            reason = stage()
        # Not a relabelling: the failure is recorded so that the partial results can be written, then re-raised
        # (a RobucapError with the stage's name prefixed, anything else as it was, traceback included).
        except Exception as error:
            records[name] = StageRecord("failed", round(time.perf_counter() - start, 1), error=_one_line(error))
            for later, _ in stages[index + 1 :]:
                records[later] = StageRecord("skipped", reason=f"not run: stage {name!r} failed")
            write()
            if isinstance(error, RobucapError):
                raise RobucapError(f"{command} stage {name!r} failed: {error}") from error
            raise
        seconds = round(time.perf_counter() - start, 1)
        records[name] = StageRecord("ok", seconds) if reason is None else StageRecord("skipped", seconds, reason=reason)
    write()
