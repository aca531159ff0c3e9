"""Tell a dataset's format from the files in its root, for commands given a bare data directory.

Each format is recognised by the files its loader reads first (see the loaders in this package):

=============  ===========================================================================================
format         recognised by
=============  ===========================================================================================
``flickr8k``   ``Flickr8k.token.txt`` and a ``Flickr_8k.*Images.txt`` split list, in the root or ``Flickr8k_text/``
``karpathy``   a ``dataset_*.json`` caption file in the root
``coco``       an ``annotations/captions_*.json`` caption file
``shapes``     a ``meta.json`` naming the generated shapes data (its COCO files do not make it ``coco`` too)
``folder``     ``captions.jsonl`` in the root or in a ``train``, ``val`` or ``test`` folder
=============  ===========================================================================================

A root matching none of them, or several (say the native Flickr8k text files next to Karpathy's
``dataset_flickr8k.json``), raises one :class:`~datamodules.errors.DataError` naming what was looked for or found:
detection never guesses between layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.errors import DataError
from datamodules.formats._common import SPLITS
from datamodules.formats.flickr8k import TEXT_DIRS, TOKEN_FILE
from datamodules.formats.folder import CAPTIONS_FILE

__all__ = ["LOOKED_FOR", "detect_format"]

# What each format is recognised by, in the words of the error messages.
LOOKED_FOR: dict[str, str] = {
    "flickr8k": f"{TOKEN_FILE} with Flickr_8k.*Images.txt (in the root or Flickr8k_text/)",
    "karpathy": "dataset_*.json",
    "coco": "annotations/captions_*.json",
    "shapes": "a meta.json of the generated shapes data",
    "folder": f"{CAPTIONS_FILE} (in the root or in train/, val/, test/)",
}


def detect_format(root: str | Path) -> str:
    """Return the format of the dataset in ``root``, from the files each loader needs.

    Args:
        root: Dataset root directory.

    Returns:
        One of ``flickr8k``, ``karpathy``, ``coco``, ``shapes``, ``folder``.

    Raises:
        DataError: ``root`` is not a directory, holds no known layout, or holds several.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data directory {base} does not exist (expected a dataset root)")
    found: dict[str, str] = {}
    flickr = _flickr8k_evidence(base)
    if flickr is not None:
        found["flickr8k"] = flickr
    karpathy = sorted(p.name for p in base.glob("dataset_*.json") if p.is_file())
    if karpathy:
        found["karpathy"] = ", ".join(karpathy)
    coco = sorted(p.name for p in base.glob("annotations/captions_*.json") if p.is_file())
    if _is_shapes(base):
        # The generator writes COCO files: they are part of the shapes layout, not a second candidate.
        found["shapes"] = "meta.json"
    elif coco:
        found["coco"] = ", ".join(f"annotations/{name}" for name in coco)
    folder = [name for name in ("", *SPLITS) if (base / name / CAPTIONS_FILE).is_file()]
    if folder:
        found["folder"] = ", ".join(f"{name}/{CAPTIONS_FILE}" if name else CAPTIONS_FILE for name in folder)
    if len(found) == 1:
        return next(iter(found))
    if found:
        what = "; ".join(f"{fmt}: {evidence}" for fmt, evidence in found.items())
        raise DataError(f"{base} holds the files of several dataset formats ({what}); name the format to use")
    looked = "; ".join(f"{fmt}: {files}" for fmt, files in LOOKED_FOR.items())
    raise DataError(f"cannot tell the dataset format of {base}: it has none of the files looked for ({looked})")


def _flickr8k_evidence(base: Path) -> str | None:
    """The native Flickr8k text files found, as ``dir/file`` names, or ``None`` unless the token file has a list."""
    for text_dir in TEXT_DIRS:
        folder = base / text_dir
        lists = sorted(p.name for p in folder.glob("Flickr_8k.*Images.txt") if p.is_file())
        if (folder / TOKEN_FILE).is_file() and lists:
            prefix = "" if text_dir == "." else f"{text_dir}/"
            return ", ".join(prefix + name for name in [TOKEN_FILE, *lists])
    return None


def _is_shapes(base: Path) -> bool:
    """Whether ``base/meta.json`` is the generated shapes data's (an unreadable one is not)."""
    try:
        meta = json.loads((base / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("name") == "shapes"
