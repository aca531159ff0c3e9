"""Scratch names tagged with the process that writes them, so leftovers of killed writers can be removed safely.

A writer that is killed (SIGKILL, the OOM killer, a lost node) cannot remove its scratch files. Tagging each
scratch name with the host and process id lets the next writer tell a leftover of a dead process from the live
scratch of a concurrent writer (another DDP rank, another run, another node on a shared file system).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["scratch_tag", "write_atomic", "writer_is_gone"]

_TAG = re.compile(r"^(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)$")


def _host() -> str:
    # Only characters that are safe in a file name; the pid follows the last "-", so dashes in the host are fine.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "localhost"


def scratch_tag() -> str:
    """The tag of this process: ``<host>-<pid>``.

    Returns:
        A string of ``[A-Za-z0-9._-]`` characters that :func:`writer_is_gone` understands.
    """
    return f"{_host()}-{os.getpid()}"


def writer_is_gone(tag: str) -> bool:
    """Whether the process named by a :func:`scratch_tag` certainly no longer runs.

    Only processes of this host can be checked: a tag of another host, or a string that is not a tag, is not
    known to be gone. A recycled pid makes a dead writer look alive (its scratch then stays), never the reverse.

    Args:
        tag: A tag written by :func:`scratch_tag`, here or in another process.

    Returns:
        True when the tag names a process of this host that does not exist.
    """
    match = _TAG.match(tag)
    if match is None or match["host"] != _host():
        return False
    try:
        os.kill(int(match["pid"]), 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by another user
    except OverflowError:
        return False  # not a pid this system can have, so not a tag written here
    return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash or a concurrent writer never leaves half of it.

    The temporary sits next to ``path`` and its name carries this process's :func:`scratch_tag`, so a later writer
    can tell a killed writer's leftover from a live one's. It is created with ``O_EXCL`` and mode ``0o666`` rather
    than by ``tempfile.mkstemp``: the kernel then applies the umask as for any ``open()`` (``mkstemp`` makes every
    file ``0600``, unreadable to the rest of a group sharing a cache).

    Args:
        path: The file to write (its parent is created).
        data: The whole content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.parent / f".{scratch_tag()}.{secrets.token_hex(4)}.tmp"
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue  # 32 random bits collided: draw another name
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
