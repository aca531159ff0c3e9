"""Training data whose order depends only on (seed, epoch) and whose place within an epoch survives a restart.

A run killed in the middle of an epoch and resumed from its last checkpoint must see the rest of that epoch's batches,
in the order the uninterrupted run would have seen them. Two pieces make that happen:

* :class:`ResumableSampler` draws the epoch's permutation from ``(seed, epoch)`` alone (never from the global RNG) and
  deals it to the ranks exactly like :class:`~torch.utils.data.distributed.DistributedSampler`, which it extends, so
  Lightning keeps it under DDP instead of wrapping it. It can be told to skip the part of an epoch already trained on.
* :class:`ResumableDataLoader` counts the batches it hands to the training loop and implements ``state_dict`` /
  ``load_state_dict``. Lightning saves that state in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
  and gives it back before the resumed run's first batch (``FitLoop.setup_data``), except when the model read
  ``trainer.estimated_stepping_batches`` first (Lightning issue #20550: the loader is then built before the restore
  and the state dropped). ``CaptioningModule`` does read it, so ``CaptionDataModule`` also keeps the state in its own
  ``state_dict`` and hands it to the training loader it creates.

Lightning's own prefetching does not disturb the count: for a loader with a length it fetches no batch ahead, and
worker processes prefetch behind the loader's back (the loader counts what leaves ``__iter__``, not what the sampler
has dealt).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from datamodules.errors import RobucapError

__all__ = ["LoaderPosition", "ResumableDataLoader", "ResumableSampler", "training_sampler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderPosition:
    """Where a training loader stands.

    Attributes:
        epoch: The epoch (sampler epoch) of the iteration in progress, or of the last one.
        batches: Batches this rank has handed to the training loop in that epoch.
    """

    epoch: int
    batches: int


@dataclass(frozen=True)
class _Skip:
    epoch: int
    start: int  # positions of the epoch's global order (all ranks together) already trained on


class ResumableSampler(DistributedSampler):
    """A :class:`~torch.utils.data.distributed.DistributedSampler` that can start an epoch part-way through.

    Without a pending skip it yields exactly what ``DistributedSampler`` yields: the permutation of
    ``torch.randperm(n, generator=seeded(seed + epoch))``, padded (or cut, with ``drop_last``) to a multiple of
    ``num_replicas``, rank ``r`` taking positions ``r, r + R, r + 2R, ...``. Lightning calls :meth:`set_epoch` at the
    start of every epoch.

    After :meth:`skip_to`, the next iteration over that epoch leaves out the first ``start`` positions of the global
    order, which rank ``r`` of the same world size and batch size had already dealt as its first ``start / R`` items:
    the resumed rank continues its own shard where it stopped.

    ``len()`` stays the full epoch's share (Lightning counts the batches done before the restart itself).

    Args:
        dataset: The training dataset (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
        shuffle: Shuffle each epoch (``False``: dataset order).
        seed: Permutation seed, the same on every rank.
        drop_last: Cut the tail instead of padding it (as in ``DistributedSampler``).
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip: _Skip | None = None

    def skip_to(self, epoch: int, start: int) -> None:
        """Make the next iteration, if it is over ``epoch``, leave out the first ``start`` global positions.

        Args:
            epoch: The epoch the skip applies to; an iteration over another epoch drops it.
            start: Positions of the epoch's global order (all ranks) already trained on, ``>= 0``.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._skip = _Skip(epoch, start)

    def _global_order(self) -> list[int]:
        """The epoch's order for all ranks together, padded or cut to ``total_size`` like ``DistributedSampler``."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        return _fit_to(indices, self.total_size)

    def __iter__(self) -> Iterator[int]:
        order = self._global_order()
        skip, self._skip = self._skip, None
        start = min(skip.start, len(order)) if skip is not None and skip.epoch == self.epoch else 0
        rest = order[start:]
        if len(rest) % self.num_replicas:
            # Only after a restart with another world or batch size: every rank must still get as many items.
            whole = len(rest) - len(rest) % self.num_replicas
            rest = _fit_to(rest, whole if self.drop_last else whole + self.num_replicas)
        return iter(rest[self.rank :: self.num_replicas])


def _fit_to(indices: list[int], size: int) -> list[int]:
    """Cut ``indices`` to ``size`` or pad it by repeating it from the start (``DistributedSampler``'s padding)."""
    if len(indices) >= size or not indices:
        return indices[:size]
    padding = size - len(indices)
    return indices + (indices * math.ceil(padding / len(indices)))[:padding]


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` that Lightning can save and restore mid-epoch.

    Lightning treats any loader with ``state_dict`` / ``load_state_dict`` as resumable: it stores the state in every
    checkpoint and, when resuming in the middle of an epoch, loads it before creating the iterator. The state is the
    :class:`LoaderPosition` plus the settings that give positions their meaning.

    ``iter()`` is lazy: the sampler is asked for the epoch's order at the first batch, after Lightning's ``set_epoch``
    for that epoch (Lightning creates the resumed run's iterator before it sets the epoch).

    Args:
        dataset: Map-style dataset.
        sampler: The sampler; its epoch, shard and seed define the order.
        **kwargs: Other ``DataLoader`` arguments (``batch_size``, ``collate_fn``, ``num_workers``, ...), no
            ``shuffle`` or ``batch_sampler``.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._resumable = sampler
        self._position = LoaderPosition(sampler.epoch, 0)
        self._resumed: LoaderPosition | None = None

    @property
    def position(self) -> LoaderPosition:
        """The current epoch and the batches handed out in it."""
        return self._position

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = self._resumable.epoch
        resumed, self._resumed = self._resumed, None
        done = resumed.batches if resumed is not None and resumed.epoch == epoch else 0
        self._position = LoaderPosition(epoch, done)
        for batch in super().__iter__():
            self._position = LoaderPosition(epoch, self._position.batches + 1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings it depends on (plain types: checkpoints load with ``weights_only``)."""
        sampler = self._resumable
        return {
            "epoch": self._position.epoch,
            "batches": self._position.batches,
            "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas,
            "dataset_size": len(self._resumable.dataset),  # type: ignore[arg-type]
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after the batches already trained on, with the checkpoint's seed.

        Raises:
            RobucapError: The checkpoint was trained on a training set of another size or shuffling.
        """
        size = len(self._resumable.dataset)  # type: ignore[arg-type]
        if state["dataset_size"] != size or state["shuffle"] != self._resumable.shuffle:
            raise RobucapError(
                f"cannot resume mid-epoch: the checkpoint was trained on {state['dataset_size']} training pairs "
                f"(shuffle={state['shuffle']}), the data now gives {size} (shuffle={self._resumable.shuffle}); resume "
                "with the run's data options (data.root, data.limit_train, data.poison)"
            )
        # The resumed run is the same run: its later epochs keep the checkpoint's permutation seed too.
        self._resumable.seed = int(state["seed"])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        start = batches * int(state["batch_size"]) * int(state["num_replicas"])
        if state["batch_size"] != self.batch_size or state["num_replicas"] != self._resumable.num_replicas:
            log.warning(
                "resuming epoch %d with batch size %s x %d ranks instead of the checkpoint's %s x %d: the rest of the "
                "epoch is dealt anew after the %d samples already trained on, so it differs from an uninterrupted run",
                epoch,
                self.batch_size,
                self._resumable.num_replicas,
                state["batch_size"],
                state["num_replicas"],
                start,
            )
        self._resumable.skip_to(epoch, start)
        self._resumed = LoaderPosition(epoch, batches)


def training_sampler(dataset: Sized, trainer: L.Trainer | None) -> ResumableSampler:
    """The training sampler for ``dataset``: sharded like Lightning's own DDP sampler, seeded by ``seed_everything``.

    The seed is ``PL_GLOBAL_SEED`` (set by ``seed_everything`` / ``seed_everything:`` in YAML, 0 without), the seed
    Lightning gives the ``DistributedSampler`` it injects. Ranks come from ``trainer.distributed_sampler_kwargs``;
    outside a Trainer, or with a single-process strategy, there is one rank. Because the sampler already is a
    ``DistributedSampler``, Lightning's ``use_distributed_sampler`` leaves it as it is.

    Args:
        dataset: The training dataset.
        trainer: The Trainer the data module is attached to, or ``None``.
    """
    shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    return ResumableSampler(
        dataset,
        num_replicas=int(shard.get("num_replicas", 1)),
        rank=int(shard.get("rank", 0)),
        shuffle=True,
        seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
    )
