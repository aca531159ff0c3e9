"""A torchmetrics base for metrics kept as integer rows per image, de-duplicated by image id across processes.

``DistributedSampler`` pads the last batch by repeating images; keeping the first row per image key makes every
metric built on this base identical in 1 and N processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


class PerImageMetric(Metric):
    """Stores an int64 image key and an int64 row of ``num_columns`` values per image.

    Args:
        num_columns: Values per image row.
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    image_keys: list[Tensor] | Tensor
    rows: list[Tensor] | Tensor

    def __init__(self, num_columns: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_columns = num_columns
        self.add_state("image_keys", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _append_rows(self, keys: list[int], rows: list[list[int]]) -> None:
        """Add one batch: a key per image and its row.

        Shape:
            ``keys``: ``(B,)``; ``rows``: ``(B, num_columns)``.
        """
        self.image_keys.append(torch.tensor(keys, dtype=torch.int64, device=self.device))
        self.rows.append(torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1, self.num_columns))

    def sync(
        self,
        dist_sync_fn: Callable | None = None,
        process_group: Any | None = None,
        should_sync: bool = True,
        distributed_available: Callable | None = None,
    ) -> None:
        """torchmetrics' public ``sync``, after giving an empty state its dtype and shape.

        torchmetrics gathers an empty list state as a 1-D float tensor; a rank that saw no images would then send a
        tensor of the wrong dtype and rank to the others. A typed empty tensor reads the same as no rows.
        """
        if isinstance(self.image_keys, list) and not self.image_keys:
            self.image_keys = [torch.zeros(0, dtype=torch.int64, device=self.device)]
        if isinstance(self.rows, list) and not self.rows:
            self.rows = [torch.zeros(0, self.num_columns, dtype=torch.int64, device=self.device)]
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def unique_rows(self) -> Tensor:
        """Rows of the unique images seen (first occurrence per key; all processes once synced).

        Shape:
            ``(M, num_columns)``.
        """
        keys, rows = self.image_keys, self.rows
        if isinstance(keys, list):
            if not keys:
                return torch.zeros(0, self.num_columns, dtype=torch.int64)
            keys, rows = dim_zero_cat(keys), dim_zero_cat(rows)
        keys = keys.reshape(-1)
        rows = rows.reshape(-1, self.num_columns)
        if keys.numel() == 0:
            return rows
        unique, inverse = torch.unique(keys, return_inverse=True)
        positions = torch.arange(keys.numel(), device=keys.device)
        first = torch.full((unique.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        return rows[first]
