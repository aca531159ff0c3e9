"""Helpers shared by the format loaders: strict file reading, caption cleaning and the final record checks.

Every helper raises :class:`~datamodules.errors.DataError` with one line naming the file (and line, column,
byte offset or field) at fault, so the loaders themselves stay short. A split that the dataset does not provide
raises the subclass :class:`~datamodules.errors.MissingSplitError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from datamodules.errors import DataError, MissingSplitError
from datamodules.records import ImageRecord
from datamodules.text import caption_tokens

SPLITS: tuple[str, ...] = ("train", "val", "test")

_BOM = b"\xef\xbb\xbf"


def check_split(split: str, fmt: str) -> None:
    """Raise unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for the {fmt} format; expected one of {', '.join(SPLITS)}")


def check_root(root: str | Path, fmt: str) -> Path:
    """Return ``root`` as a path after checking that it is a directory."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset root {path} for the {fmt} format is not a directory")
    return path


def fill(template: str, split: str) -> str:
    """Substitute ``{split}`` in a path template (plain replacement: other braces in paths stay literal)."""
    return template.replace("{split}", split)


def require_file(path: Path, fmt: str, what: str) -> Path:
    """Return ``path`` when it is a file, else raise naming the format that expects it."""
    if not path.is_file():
        raise DataError(f"the {fmt} format expects {what} at {path}, but there is no such file")
    return path


def require_split_file(path: Path, fmt: str, what: str) -> Path:
    """Like :func:`require_file` for the file that defines a split: its absence means the split is missing.

    Raises:
        MissingSplitError: When ``path`` is not a file.
    """
    if not path.is_file():
        raise MissingSplitError(f"the {fmt} format expects {what} at {path}, but there is no such file")
    return path


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (an optional BOM is dropped), naming the byte offset of any invalid byte."""
    data = path.read_bytes()
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + skip
        raise DataError(
            f"{path} is not UTF-8 text: invalid byte 0x{data[offset]:02x} at byte offset {offset}; "
            "save the caption file as UTF-8"
        ) from error


def read_json(path: Path) -> Any:
    """Parse a UTF-8 JSON file, naming the line and column of a syntax error."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from error


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of a JSON Lines file."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} line {number} is not valid JSON: {error.msg} at column {error.colno}; "
                "expected one JSON object per line"
            ) from error
        if not isinstance(value, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
        yield number, value


def expect(value: Any, kind: type | tuple[type, ...], source: Path, field: str) -> Any:
    """Return ``value`` when it has the expected JSON type, else raise naming the field."""
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{source}: {field} must be {_JSON_NAMES.get(names, names)}, got {_describe(value)}")
    return value


def get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: Path, where: str) -> Any:
    """Return ``obj[key]`` checked by :func:`expect`, raising when the key is missing (``where=""``: top level)."""
    if key not in obj:
        raise DataError(f"{source}: {where or 'the top-level object'} has no {key!r} field")
    return expect(obj[key], kind, source, f"{where}.{key}" if where else key)


def clean_caption(raw: Any, source: Path, image: Any, position: str) -> str:
    """Return the stripped caption, raising when it is not a string, is empty or has no word.

    A caption without a word once normalised by :func:`datamodules.text.caption_tokens` (e.g. ``"...!"``)
    would train the model to stop at once and would score as an empty reference, so it is rejected like an
    empty one.
    """
    if not isinstance(raw, str):
        raise DataError(f"{source}: {position} of image {image!r} must be a string, got {_describe(raw)}")
    caption = raw.strip()
    if not caption:
        raise DataError(f"{source}: {position} of image {image!r} is empty; every caption must contain text")
    if not caption_tokens(caption):
        raise DataError(
            f"{source}: {position} of image {image!r} is {_describe(caption)}, which is empty once normalised "
            "(lower-cased, punctuation removed); every caption must contain at least one word"
        )
    return caption


def require_dir(path: Path, fmt: str, what: str) -> Path:
    """Return ``path`` when it is a directory, else raise naming the format that expects it."""
    if not path.is_dir():
        raise DataError(f"the {fmt} format expects {what} in the folder {path}, but there is no such folder")
    return path


def detect_dir(root: Path, candidates: Sequence[str], probes: Sequence[str], fmt: str, source: Path) -> Path:
    """Pick the image folder among ``candidates`` (relative to ``root``) and ``root`` itself by the probe files.

    The folder holding most probes wins (ties go to the earlier candidate). Without probes (an empty split) the
    root is returned and the empty-split check reports the problem.

    Raises:
        DataError: When no candidate holds any probe, naming the first probe and where it was looked for.
    """
    folders = [root / name for name in candidates if (root / name).is_dir()] + [root]
    hits = [sum((folder / probe).is_file() for probe in probes) for folder in folders]
    if probes and max(hits) == 0:
        raise DataError(
            f"{source}: cannot find image {probes[0]!r} in any of {', '.join(candidates)} or the dataset root "
            f"{root}; pass image_dir=... to the {fmt} format if the images are elsewhere"
        )
    return folders[hits.index(max(hits))]


def finish(records: list[ImageRecord], source: Path, split: str, fmt: str, hint: str = "") -> list[ImageRecord]:
    """Check a split's records (non-empty, every image exists) and return them sorted by image id."""
    if not records:
        raise MissingSplitError(f"{source}: split {split!r} has no images ({fmt} format); expected at least one{hint}")
    missing = [record.path for record in records if not record.path.is_file()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(records)} images of split {split!r} are missing; "
            f"first missing: {missing[0]}"
        )
    # Ints sort numerically and strings lexically; a mixed dataset puts all ints first.
    return sorted(records, key=lambda record: (isinstance(record.image_id, str), record.image_id))


class RealPaths:
    """Resolves image paths exactly like :func:`os.path.realpath`, at the cost of one folder listing per folder.

    ``os.path.realpath`` checks every component of every path, which over all images of a large dataset (123k
    for Karpathy's COCO) costs seconds. Here each folder is resolved and listed once; a file is followed only
    when the listing says it is a symlink. No containment check: a split's own load reports paths that leave
    its image root, so here they are only compared.
    """

    def __init__(self) -> None:
        self._folders: dict[str, tuple[str, frozenset[str]]] = {}

    def __call__(self, root: str | Path, relative: str) -> str:
        """Return the resolved path of ``relative`` joined onto ``root`` (the file need not exist)."""
        joined = os.path.join(root, relative)
        folder, name = os.path.split(joined)
        if name in ("", ".", ".."):
            return os.path.realpath(joined)
        known = self._folders.get(folder)
        if known is None:
            real = os.path.realpath(folder)
            known = self._folders[folder] = (real, _symlinks_in(real))
        real, links = known
        candidate = os.path.join(real, name)
        return os.path.realpath(candidate) if name in links else candidate


def _symlinks_in(folder: str) -> frozenset[str]:
    """Names of the symlinks directly in ``folder`` (from the directory listing: no stat per file)."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name for entry in entries if entry.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()  # no folder, so no links; the split's own load reports its missing images


class Listing(NamedTuple):
    """Where a split lists an image, for the message when two splits list the same one.

    Attributes:
        split: The split the entry puts the image in.
        source: The file that lists it.
        name: The image as written there.
        where: Position inside ``source`` (``"line 3"``, ``"images[2]"``), or ``""``.
    """

    split: str
    source: Path
    name: str
    where: str = ""

    def place(self) -> str:
        """``source`` followed by the position, for messages."""
        return f"{self.source} {self.where}" if self.where else str(self.source)


class SplitMembers:
    """Remembers the split of every image file seen and rejects a file that two splits list.

    Images are identified by their resolved path (see :class:`RealPaths`), so two spellings of one path, or a
    symlink and its target, are the same image. An image in train and test would leak test images into
    training; in val and test it would be scored twice. Repeats within one split are the loader's business.
    """

    def __init__(self) -> None:
        self._first: dict[str, Listing] = {}
        self.resolve = RealPaths()

    def add(self, root: str | Path, relative: str, listing: Listing) -> None:
        """Record that ``listing`` puts the image file ``relative`` (under ``root``) in its split.

        Raises:
            DataError: When an earlier listing put the same file in another split, naming the image, both
                splits and where each lists it.
        """
        first = self._first.setdefault(self.resolve(root, relative), listing)
        if first.split == listing.split:
            return
        image = repr(listing.name)
        if first.name != listing.name:
            image += f" (the same file as {first.name!r})"
        leak = ""
        if "train" in (first.split, listing.split):
            leak = " (training on evaluation images inflates their scores)"
        raise DataError(
            f"image {image} is in both the {first.split} split ({first.place()}) and the {listing.split} split "
            f"({listing.place()}); list each image in one split only{leak}"
        )


_JSON_NAMES = {
    "list": "a list",
    "dict": "an object",
    "str": "a string",
    "int": "an integer",
    "int or float": "a number",
}


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
