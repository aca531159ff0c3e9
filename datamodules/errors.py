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
