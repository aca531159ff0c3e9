"""Progress bars that leave the terminal tidy when the work they track fails.

An error raised inside a ``for item in tqdm(...)`` body leaves the bar open (the loop's generator is only closed
once the traceback is dropped), so the message printed next, such as the CLI's ``robucap: error: ...``, lands
after the bar's carriage return on the bar's own line. :func:`progress_bar` closes the bar as the error leaves
the block, and keeps it with its line ended so the message starts on a fresh line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(**options: Any) -> Iterator[tqdm]:
    """Open a tqdm bar for the ``with`` block and close it however the block ends.

    On success the bar is closed as configured (``leave=False`` erases it). On an error (including Ctrl-C) it
    is kept, showing how far the work got, and its line is ended before the error propagates.

    Args:
        **options: tqdm options (``iterable``, ``total``, ``desc``, ``disable``, ``leave``, ...).

    Yields:
        The bar.
    """
    bar = tqdm(**options)
    try:
        yield bar
    except BaseException:
        bar.leave = True  # close() then redraws the bar and writes a newline
        raise
    finally:
        bar.close()
