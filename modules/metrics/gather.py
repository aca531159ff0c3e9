"""Gather per-image evaluation records from every DDP process, once per image.

Test-time metrics (pycocoevalcap, ASR, ...) run on plain Python records such as
``{"image_id": 7, "caption": "a dog", "references": [...]}``. Under DDP each rank holds a shard, and
``DistributedSampler`` pads the shards by repeating samples; :func:`gather_unique` collects all shards and drops
those repeats so every image counts exactly once, whatever the world size.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from datamodules.errors import RobucapError

__all__ = ["gather_unique"]


def _hashable_key(value: Any, key: str, index: int) -> Hashable:
    # A 0-d tensor hashes by identity, so two copies of the same id would never match; compare their values.
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise RobucapError(f"record {index}: {key!r} must be a scalar id, got a tensor of shape {shape}")
        value = value.item()
    elif hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars
    try:
        hash(value)
    except TypeError:
        kind = type(value).__name__
        raise RobucapError(f"record {index}: {key!r} must be hashable (int or str), got {kind}") from None
    return value


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_unique(
    records: Sequence[Mapping[str, Any]],
    key: str = "image_id",
    group: Any | None = None,
) -> list[dict[str, Any]]:
    """Collect records from all processes and keep the first one per ``key``, in a deterministic order.

    When ``torch.distributed`` is initialised with more than one process this is a collective call: every rank
    must call it, and every rank receives the same full list. Otherwise it only de-duplicates and sorts.

    Args:
        records: This process's records (picklable mappings), each holding ``key``.
        key: The field that identifies an image (int or str; scalar tensors are compared by value).
        group: Process group for the gather; the default group when ``None``.

    Returns:
        One record (as a ``dict``) per distinct key, the first seen in rank order then local order, sorted by the
        stringified key (ties between e.g. ``7`` and ``"7"`` broken by type name).

    Raises:
        RobucapError: If a record lacks ``key`` or its value is not a usable id.
    """
    local = [dict(record) for record in records]
    if _distributed():
        world_size = dist.get_world_size(group)
        shards: list[list[dict[str, Any]] | None] = [None] * world_size
        dist.all_gather_object(shards, local, group=group)
        gathered = [record for shard in shards for record in (shard or [])]
    else:
        gathered = local

    # Validate only after the collective: a rank that raised before it would leave the others waiting forever.
    unique: dict[Hashable, dict[str, Any]] = {}
    for index, record in enumerate(gathered):
        if key not in record:
            raise RobucapError(f"record {index}: missing field {key!r} (has {sorted(record)})")
        unique.setdefault(_hashable_key(record[key], key, index), record)
    order = sorted(unique, key=lambda k: (str(k), type(k).__name__))
    return [unique[k] for k in order]
