"""The random-number stream of training steps: saved in every checkpoint, restored when a run resumes.

Dropout, and the random start of attacks such as ``fgsm_rs`` in
:class:`~callbacks.adversarial_training.AdversarialTraining` (which runs with the model in train mode), draw from the
global generators: torch (CPU, and the rank's CUDA device), numpy and Python's ``random``. A run resumed from a
checkpoint without their states draws other numbers and ends with other weights.

Saving the states at checkpoint time is not enough: between two training steps the uninterrupted run also draws for
things a resumed run does differently or not at all (the validation loop and its DataLoader iterator, the new
epoch's iterator, which take a seed from the global generator; validation that was due right after a mid-epoch
checkpoint is skipped on resume). So :class:`TrainingRNG` keeps training's own stream apart from everything else: it
puts the stream into the global generators when a training step starts and takes it back when the step ends. Steps
then draw exactly the same numbers whether or not the run was interrupted, and validation or logging in between can
use the generators freely.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RNGSnapshot", "TrainingRNG"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RNGSnapshot:
    """The states of the global generators of one process, as their libraries return them.

    Attributes:
        torch_cpu: ``torch.get_rng_state()``. Shape: ``(5056,)`` uint8.
        torch_cuda: ``torch.cuda.get_rng_state()`` of the current device, ``None`` when CUDA is not in use.
        numpy: ``numpy.random.get_state()``: ``("MT19937", keys, pos, has_gauss, cached_gaussian)``.
        python: ``random.getstate()``: ``(version, internal state, gauss_next)``.
    """

    torch_cpu: torch.Tensor
    torch_cuda: torch.Tensor | None
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]

    @classmethod
    def capture(cls) -> RNGSnapshot:
        """The current states (CUDA only when this process has already initialised it)."""
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(legacy=True), random.getstate())

    def restore(self) -> None:
        """Put these states into the global generators."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)

    def to_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only, so that checkpoints load with ``torch.load(weights_only=True)``."""
        name, keys, pos, has_gauss, gauss = self.numpy
        version, internal, gauss_next = self.python
        return {
            "torch_cpu": self.torch_cpu,
            "torch_cuda": self.torch_cuda,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss_next],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RNGSnapshot:
        """The inverse of :meth:`to_dict`."""
        name, keys, pos, has_gauss, gauss = state["numpy"]
        version, internal, gauss_next = state["python"]
        return cls(
            torch_cpu=state["torch_cpu"],
            torch_cuda=state["torch_cuda"],
            numpy=(name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
            python=(version, tuple(internal.tolist()), gauss_next),
        )


class TrainingRNG(L.Callback):
    """Give training steps their own random stream, saved in checkpoints and restored on resume.

    Every training step starts from the stream as the previous step left it (``on_train_batch_start`` restores it
    into the global generators, ``on_train_batch_end`` captures it again), so whatever draws random numbers between
    steps cannot shift it, and a resumed run's first step starts from the state saved after the checkpoint's step.
    What a step draws inside the window (dropout, an attack's random start in ``on_train_batch_start``, the
    optimizer) is the same in an interrupted and an uninterrupted run.

    The window must open before any other callback's ``on_train_batch_start``: :meth:`setup` moves this callback to
    the front of ``trainer.callbacks`` (Lightning calls callback hooks in that order, and only moves checkpoint
    callbacks to the end).

    Under DDP each rank has its own stream; a checkpoint holds all of them (gathered when it is saved, which Lightning
    does on every rank) and each rank takes back its own. Resumed with another number of ranks, ranks beyond the
    saved ones keep their freshly seeded generators (the data is dealt differently then anyway).

    The first step of a fresh run starts from the generators as ``on_train_start`` finds them (after
    ``seed_everything`` and model initialisation). Exactness also needs the same data order (the data module's
    :class:`~datamodules.sampler.ResumableDataLoader`) and deterministic kernels (CPU; on GPU see
    ``Trainer(deterministic=True)``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._stream: RNGSnapshot | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts a new stream; Lightning loads a resumed checkpoint's stream after this hook.
        self._stream = None
        # Moving this callback from index i to 0 while Lightning iterates over the list is safe: the callbacks after
        # it keep their indices, so none is skipped or called twice.
        callbacks = trainer.callbacks
        if callbacks and callbacks[0] is not self:
            callbacks.remove(self)
            callbacks.insert(0, self)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stream is None:
            self._stream = RNGSnapshot.capture()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stream is not None:
            self._stream.restore()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stream = RNGSnapshot.capture()

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream (a collective under DDP: Lightning builds checkpoints on all ranks)."""
        local = self._stream.to_dict() if self._stream is not None else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[dict[str, Any] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if len(ranks) != world and rank == 0:
            log.warning(
                "the checkpoint holds the random streams of %d ranks, this run has %d: steps after the resume do not "
                "draw what the uninterrupted run would have",
                len(ranks),
                world,
            )
        saved = ranks[rank] if rank < len(ranks) else None
        self._stream = RNGSnapshot.from_dict(saved) if saved is not None else None
