"""Run a function in N CPU processes joined by a gloo process group, and collect what each returns.

Usage::

    def _worker(rank: int, world_size: int, data: list[int]) -> float:  # module level, so it pickles
        ...  # torch.distributed is initialised here
        return value

    results = run_ddp(_worker, 2, data)  # [value of rank 0, value of rank 1]

The function must be picklable (defined at module level in a test module or helper); use
:func:`functools.partial` for keyword arguments. Each process runs with one intra-op thread so that two workers
do not fight over the CI machine's cores.

Processes are started with ``torch.multiprocessing.start_processes`` (what ``torch.multiprocessing.spawn``
wraps). On Linux the default start method is ``fork``: a spawned child re-imports torch, torchvision and
torchmetrics, about 5-10 s of CPU per process, against well under a second for a forked one. The parent never
initialises a process group or CUDA itself, which is what makes forking safe here; pass
``start_method="spawn"`` for code that needs a pristine interpreter.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ddp"]

T = TypeVar("T")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    backend: str,
    init_group: bool,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    # The env:// variables let code inside the worker (e.g. a Lightning Trainer) find the same group.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # gloo otherwise resolves the hostname, which in containers may point at an interface it cannot reach.
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if init_group:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
    try:
        result = fn(rank, world_size, *args)
    finally:
        if init_group and dist.is_initialized():
            dist.destroy_process_group()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_ddp(
    fn: Callable[..., T],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    init_group: bool = True,
    start_method: str | None = None,
) -> list[T]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes and return their results.

    Args:
        fn: Module-level function; receives its rank and the world size first, then ``args``.
        world_size: Number of processes (pass it positionally when also passing ``args``).
        *args: Picklable arguments for ``fn``.
        timeout_s: Wall-clock limit for all processes; they are killed and ``TimeoutError`` raised past it.
        backend: ``torch.distributed`` backend (gloo: CPU only).
        init_group: Initialise (and afterwards destroy) the default process group around ``fn``. With
            ``False`` only the ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` variables are set.
        start_method: ``"fork"`` or ``"spawn"``; ``None`` picks fork where the platform offers it, else spawn.

    Returns:
        The (picklable) return values, indexed by rank.

    Raises:
        torch.multiprocessing.ProcessRaisedException: If a worker raised (the message holds its traceback).
        TimeoutError: If the workers did not finish within ``timeout_s``.
    """
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux") else "spawn"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="robucap-ddp-") as out_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, port, out_dir, backend, init_group, fn, args),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        # join() raises as soon as one worker fails and terminates the others.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join(timeout=10)
                raise TimeoutError(f"run_ddp: {world_size} workers did not finish within {timeout_s:.0f} s")
        results: list[T] = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
    return results
