"""Keep a run's output to what the user needs: drop third-party advice that robucap already acts on.

Each filter names one message and why it is safe to hide; nothing else is silenced.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's advertising for its hosted services, printed by every Trainer.
_TIP_PREFIX = "💡 Tip:"
# Lightning's own call into a torch API it deprecated (lightning/pytorch/utilities/_pytree.py): nothing a user
# can change.
_LEAFSPEC = r".*isinstance\(treespec, LeafSpec\)`? is deprecated.*"
# CaptioningModule logs ``train/epoch_loss`` every epoch, so short runs are never left without a training loss.
_LOG_EVERY_N = r"The number of training batches .* is smaller than the logging interval.*"
# Internal detail of how Lightning sizes the learning-rate schedule.
_STEPPING_BATCHES = "Loading `train_dataloader` to estimate number of stepping batches."
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message=_LEAFSPEC)
    warnings.filterwarnings("ignore", message=_LOG_EVERY_N)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages((_TIP_PREFIX, _STEPPING_BATCHES)))


def quiet_evaluation() -> None:
    """For ``validate``, ``test`` and ``predict``: checkpoint callbacks restored from ``--ckpt_path`` warn that their
    directory changed, which only matters to a training run that goes on writing checkpoints."""
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .*")
