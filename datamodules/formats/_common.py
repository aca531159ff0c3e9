"""Helpers shared by the format loaders: strict file reading, caption cleaning and the final record checks.

Every helper raises :class:`~datamodules.errors.DataError` with one line naming the file (and line, column,
byte offset or field) at fault, so the loaders themselves stay short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.errors import DataError
from datamodules.records import ImageRecord

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
    """Return the stripped caption, raising when it is not a string or is empty."""
    if not isinstance(raw, str):
        raise DataError(f"{source}: {position} of image {image!r} must be a string, got {_describe(raw)}")
    caption = raw.strip()
    if not caption:
        raise DataError(f"{source}: {position} of image {image!r} is empty; every caption must contain text")
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
        raise DataError(f"{source}: split {split!r} has no images ({fmt} format); expected at least one{hint}")
    missing = [record.path for record in records if not record.path.is_file()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(records)} images of split {split!r} are missing; "
            f"first missing: {missing[0]}"
        )
    # Ints sort numerically and strings lexically; a mixed dataset puts all ints first.
    return sorted(records, key=lambda record: (isinstance(record.image_id, str), record.image_id))


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
