"""The one exception type for bad user input.

Every layer raises :class:`RobucapError` (or a subclass) with a message that names the file or field at
fault and what was expected. The CLI prints that message on one line and exits with status 2, so users
never see a bare traceback for a mistake in their data or options.
"""

from __future__ import annotations


class RobucapError(ValueError):
    """Bad user input: a missing or corrupt file, a wrong format, a value out of range, an impossible option."""


class DataError(RobucapError):
    """A dataset, caption file, image or tokenizer that cannot be used as given."""


class MissingSplitError(DataError):
    """A split the dataset does not provide: its caption or list file is absent, or it lists no images.

    Distinct from other :class:`DataError` cases so that callers which can do without a split (for example
    building a tokenizer needs ``train``, evaluation does not) give advice only when the split is really absent.
    """
