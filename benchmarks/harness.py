"""What every benchmark shares: options, machine description, device-synchronised timing, statistics, JSON report.

Run the scripts from the repository root as modules (``.venv/bin/python -m benchmarks.train_step``), so that
``benchmarks.*`` and robucap's own packages import without any ``sys.path`` change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = [
    "add_device_option",
    "add_threads_option",
    "default_device",
    "load_average",
    "machine_info",
    "quartiles",
    "quiet_lightning",
    "sync_device",
    "write_report",
]


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``: the default of every ``--device`` option."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (default: :func:`default_device`); ``make bench-gpu`` passes ``--device cuda``."""
    parser.add_argument("--device", default=default_device())


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` (torch CPU threads; default: torch's choice)."""
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice). On a machine shared with other jobs, 1 avoids the "
        "large, erratic slow-downs of oversubscribed OpenMP threads",
    )


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(values: Sequence[float]) -> list[float]:
    """First and third quartiles (the value twice for a single sample)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter and the warnings a bare benchmark ``Trainer`` triggers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS does not report them).

    Other jobs on a shared machine move absolute times, so reports record the load next to them.
    """
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, library versions and the training device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str], low: int) -> None:
    """Stop with the parser's usage error when an option given (not ``None``) is below ``low``."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")


def start(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """What every Lightning benchmark does first: apply ``--device`` / ``--threads``, quiet Lightning, and describe
    the machine (after the thread count is set, so the report shows it)."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    return device, machine_info(device)


def write_report(
    name: str,
    argv: Sequence[str] | None,
    machine: dict[str, Any],
    results: Any,
    out: Path,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a benchmark's JSON report (with the command that reproduces it) and return it.

    Args:
        name: Benchmark name (its module is ``benchmarks.<name>``).
        argv: The script's arguments (``None``: ``sys.argv[1:]``).
        machine: :func:`machine_info`.
        results: The measured rows.
        out: Output file.
        config: Settings shared by all rows, if any.
    """
    command = [".venv/bin/python", "-m", f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)]
    report: dict[str, Any] = {"benchmark": name, "command": shlex.join(command), "machine": machine}
    if config is not None:
        report["config"] = config
    report["results"] = results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}" + (f" ({config['wall_s']:.0f} s timed)" if config and "wall_s" in config else ""))
    return report
