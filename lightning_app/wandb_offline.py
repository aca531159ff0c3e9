"""Read metrics back from an offline W&B run directory without a server (``run-<id>.wandb``).

The ``.wandb`` file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version) followed by
LevelDB-log framed records (32 KiB blocks; each chunk has a CRC, a little-endian length and a FULL / FIRST /
MIDDLE / LAST type) holding ``wandb_internal_pb2.Record`` protobufs. ``wandb sync`` uploads the same file.

wandb-core appends to the log from its own process, so a reader can meet a tail that is still being written (a
chunk whose length runs past the end of the file, or whose bytes do not match its CRC yet, or a record whose LAST
chunk has not arrived). Like LevelDB's own log reader, that tail is dropped: the records before it are complete.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from datamodules.errors import RobucapError

_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    """The complete records of a transaction log, in order; a tail still being written is left out."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise RobucapError(f"{path} is not a W&B transaction log (expected the ':W&B' header)")
    records: list[bytes] = []
    pending = b""
    pos = 7
    while pos + _CHUNK_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER:  # block trailer padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding ahead of the writer
            pos += _CHUNK_HEADER
            continue
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        # wandb-core's CRC is the plain (unmasked) CRC-32 of the type byte and the payload.
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break  # the tail the writer has not finished
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def find_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files under a W&B directory (``<save_dir>/wandb``), oldest first."""
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))


def read_offline_run(run_file: str | Path) -> dict[str, Any]:
    """History rows, config and summary of an offline run.

    Args:
        run_file: A ``run-<id>.wandb`` file.

    Returns:
        ``{"history": [row, ...], "config": {...}, "summary": {...}}`` with JSON-decoded values.
    """
    from wandb.proto import wandb_internal_pb2

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for raw in _records(Path(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): _value(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({_key(i): _value(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({_key(i): _value(i.value_json) for i in record.summary.update})
    return {"history": history, "config": config, "summary": summary}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
