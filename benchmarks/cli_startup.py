"""Seconds before ``robucap --help`` and ``robucap fit --help`` print (goal: under 3 s warm).

Each command runs as a fresh process, as a user types it. ``fit --help`` is measured twice: *cold* (its help cache
emptied before every run, so LightningCLI builds the parser: torch, Lightning and transformers imported) and *warm*
(the cache filled by the first call, as on any machine where robucap has run once). Cold and warm runs are
interleaved so both see the same machine load; the figures are medians of ``--repeats`` runs and the headline is
the cold / warm ratio. The cache lives in a temporary ``ROBUCAP_CACHE_DIR``, so the user's own cache is untouched.

Example::

    .venv/bin/python -m benchmarks.cli_startup --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import machine_info, write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks/results/cli_startup.json")


def _robucap() -> str:
    script = Path(sys.executable).parent / "robucap"
    return str(script) if script.is_file() else "robucap"


def seconds(argv: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one ``robucap`` process (output discarded; a failure aborts the benchmark)."""
    start = time.perf_counter()
    subprocess.run([_robucap(), *argv], env=env, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant (median reported)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cache = Path(tempfile.mkdtemp(prefix="robucap-help-bench-"))
    env = {**os.environ, "ROBUCAP_CACHE_DIR": str(cache), "COLUMNS": "100"}
    names = ("robucap --help", "robucap fit --help (warm)", "robucap fit --help (cold)")
    runs: dict[str, list[float]] = {name: [] for name in names}
    try:
        seconds(["fit", "--help"], env)  # fills the cache for the first warm run
        for _ in range(args.repeats):
            runs["robucap --help"].append(seconds(["--help"], env))
            runs["robucap fit --help (warm)"].append(seconds(["fit", "--help"], env))
            shutil.rmtree(cache / "help", ignore_errors=True)
            runs["robucap fit --help (cold)"].append(seconds(["fit", "--help"], env))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    results = [
        {"command": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times}
        for name, times in runs.items()
    ]
    cold = statistics.median(runs["robucap fit --help (cold)"])
    warm = statistics.median(runs["robucap fit --help (warm)"])
    for row in results:
        print(f"{row['command']:<28} median {row['median_s']:6.2f} s  (min {row['min_s']:.2f}, max {row['max_s']:.2f})")
    print(f"cold / warm fit --help: {cold / warm:.1f}x")
    machine = machine_info(torch.device("cpu"))
    return write_report("cli_startup", argv, machine, results, args.out, config={"repeats": args.repeats})


if __name__ == "__main__":
    main()
