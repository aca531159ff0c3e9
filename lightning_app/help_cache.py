"""Instant ``robucap <command> --help``.

LightningCLI builds its help from the signatures of the Trainer, the module and the data module, and the attack,
study, export and demo parsers sit next to the code they run, which means importing torch, Lightning and
transformers (15-20 s on a 2-core machine) just to print text. The text only
changes when robucap's code, its defaults or a library version changes, so it is kept in a cache keyed by a hash
of exactly those; a stale entry can never match, and a missing or unreadable one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from datamodules.scratch import write_atomic

REPO = Path(__file__).resolve().parents[1]
# The code and files the help text is generated from.
_SOURCES = ("lightning_app", "modules", "datamodules", "callbacks")
_DEFAULTS = REPO / "configs" / "defaults.yaml"
_LIBRARIES = ("lightning", "jsonargparse", "torch", "transformers", "torchmetrics")


def cache_dir() -> Path:
    """``$ROBUCAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/robucap``, else ``~/.cache/robucap``."""
    if os.environ.get("ROBUCAP_CACHE_DIR"):
        return Path(os.environ["ROBUCAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "robucap"


def help_key(subcommand: str) -> str:
    """Hash of everything the help text depends on: sources, defaults, library versions and terminal width."""
    digest = hashlib.sha256()
    digest.update(f"{subcommand}\0{sys.version}\0{shutil.get_terminal_size().columns}\0".encode())
    for name in _LIBRARIES:
        try:
            digest.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none\0".encode())
    files = sorted(p for folder in _SOURCES for p in (REPO / folder).rglob("*.py"))
    for path in [*files, _DEFAULTS]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:32]


def cached_help(subcommand: str, produce: Callable[[], None]) -> str:
    """The help text of ``subcommand``, from the cache or by running ``produce`` (which prints it and exits).

    Args:
        subcommand: The command words joined by ``-`` (``fit``, ``attack-fgsm``, ``study-freeze``...).
        produce: Prints the help to stdout (it may raise ``SystemExit(0)`` as argparse does).

    Returns:
        The help text.
    """
    # "<command words>.<key>.txt": command words never hold a dot, so the glob below matches this command only.
    path = cache_dir() / "help" / f"{subcommand}.{help_key(subcommand)}.txt"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text(encoding="utf-8")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            produce()
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    text = buffer.getvalue()
    for stale in path.parent.glob(f"{subcommand}.*.txt"):
        # Entries of older code or library versions can never match again.
        with contextlib.suppress(OSError):
            stale.unlink()
    _store(path, text)
    return text


def _store(path: Path, text: str) -> None:
    """Write atomically; a read-only or full cache only costs speed."""
    with contextlib.suppress(OSError):
        write_atomic(path, text.encode("utf-8"))
