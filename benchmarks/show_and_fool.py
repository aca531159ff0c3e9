"""Show-and-Fool seconds per image for 1000 iterations at batch 1 and batch 32: the batching speedup.

Each measurement is one round of the attack (``search_rounds=1``, ``abort_early=False``, so every image runs exactly
``--iterations`` Adam iterations) on random images towards fixed-length random target captions, with a freshly built
``tiny`` captioner (``vit_gpt2`` and ``show_attend_tell``; weights do not change the cost of an iteration). Batch 1
attacks ``--batch-large`` images one after the other; batch ``--batch-large`` attacks the same images at once. The
two are interleaved within each repetition and the speedup is the median over repetitions of the per-repetition
ratio ``(seconds per image at batch 1) / (seconds per image at batch B)``, so both sides of a ratio see the same
machine load. Seconds per image are scaled to 1000 iterations when ``--iterations`` is smaller (the cost is linear in
iterations: every iteration is one forward and one backward pass).

Show-and-Fool (Chen et al. 2018) reports 38 s per image for 1000 iterations on a GTX 1080 Ti (Inception-v3 + LSTM,
299 px, batch 1).

Example::

    .venv/bin/python -m benchmarks.show_and_fool --threads 1                   # about 15 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.show_and_fool --iterations 100 --repeats 1  # about 2 minutes
    .venv/bin/python -m benchmarks.show_and_fool --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import add_device_option, machine_info, sync_device, write_report
from benchmarks.synthetic import build_tokenizer
from modules.attacks import ShowAndFool
from modules.captioning import CaptioningModule
from modules.victims import CaptionObjective

DEFAULT_OUT = Path("benchmarks/results/show_and_fool.json")
ARCHS = ("vit_gpt2", "show_attend_tell")
TARGET_WORDS = 10  # a typical shapes caption ("a large red circle to the left of a small blue square")
PAPER_SECONDS_PER_IMAGE = 38.0


def _timed_attack(
    attack: ShowAndFool, module: CaptioningModule, images: torch.Tensor, targets: list[list[int]]
) -> float:
    # Show-and-Fool's targeted-caption objective (eq. 7), built outside the timed window.
    objective = CaptionObjective.targeting(module.captioner, targets, loss="logits", device=images.device)
    sync_device(images.device)
    start = time.perf_counter()
    attack(objective, images)
    sync_device(images.device)
    return time.perf_counter() - start


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved batch-1 and batch-B timings of one architecture."""
    tokenizer = build_tokenizer(args.seed)
    torch.manual_seed(args.seed)
    captioner = {"class_path": arch, "init_args": {"preset": "tiny"}}
    module = CaptioningModule.with_tokenizer(tokenizer, captioner=captioner, image_size=args.image_size)
    module = module.to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch_large, 3, args.image_size, args.image_size, generator=gen).to(device)
    # Ids of real words (specials are the first 4 ids), so every target caption has exactly TARGET_WORDS words.
    targets = torch.randint(4, len(tokenizer), (args.batch_large, TARGET_WORDS), generator=gen).tolist()
    attack = ShowAndFool(iterations=args.iterations, search_rounds=1, abort_early=False)
    scale = 1000.0 / args.iterations
    single, batched, ratios = [], [], []
    _timed_attack(ShowAndFool(iterations=3, search_rounds=1), module, images[:2], targets[:2])  # warm-up
    for repeat in range(args.repeats):
        # Alternate which side goes first, so a load change within a repetition does not favour one side.
        order = ("single", "batched") if repeat % 2 == 0 else ("batched", "single")
        seconds: dict[str, float] = {}
        for side in order:
            if side == "single":
                total = sum(
                    _timed_attack(attack, module, images[i : i + 1], targets[i : i + 1])
                    for i in range(args.batch_large)
                )
            else:
                total = _timed_attack(attack, module, images, targets)
            seconds[side] = scale * total / args.batch_large
        single.append(seconds["single"])
        batched.append(seconds["batched"])
        ratios.append(seconds["single"] / seconds["batched"])
        print(
            f"  {arch} repeat {repeat}: {seconds['single']:.2f} s/image at batch 1, "
            f"{seconds['batched']:.3f} s/image at batch {args.batch_large}, speedup {ratios[-1]:.1f}x",
            flush=True,
        )
    return {
        "arch": arch,
        "preset": "tiny",
        "image_size": args.image_size,
        "parameters": sum(p.numel() for p in module.parameters()),
        "seconds_per_image_batch1": statistics.median(single),
        f"seconds_per_image_batch{args.batch_large}": statistics.median(batched),
        "speedup": statistics.median(ratios),
        "speedup_runs": ratios,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--iterations", type=int, default=1000, help="Adam iterations per measurement (scaled to 1000)")
    parser.add_argument("--batch-large", type=int, default=32, help="the batched side's batch size")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    add_device_option(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_large < 2 or args.repeats < 1:
        parser.error("--iterations and --repeats must be >= 1 and --batch-large >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    print(f"machine: {machine}", flush=True)
    results = [bench_arch(arch, args, device) for arch in args.archs]
    lines = [
        f"| {r['arch']} | {r['seconds_per_image_batch1']:.2f} | {r[f'seconds_per_image_batch{args.batch_large}']:.3f} "
        f"| {r['speedup']:.1f}x | {PAPER_SECONDS_PER_IMAGE / r['seconds_per_image_batch1']:.1f}x |"
        for r in results
    ]
    print(f"| model | s/image batch 1 | s/image batch {args.batch_large} | speedup | vs paper's 38 s (batch 1) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    return write_report("show_and_fool", argv, machine, results, args.out, settings)


if __name__ == "__main__":
    main()
