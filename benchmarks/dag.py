"""DAG (Xie et al. 2017) seconds per image for detection and segmentation, batch 1 against batch 16, paired.

Each victim (the ``small`` Faster R-CNN and the ``small`` segmenter, randomly initialised, or a checkpoint given with
``--detector-ckpt`` / ``--segmenter-ckpt``) is attacked on the same ``--batch-large`` synthetic images (filled
rectangles of five classes on a grey background, their boxes and masks the ground truth): one image at a time and all
at once, interleaved within each repetition (the side that goes first alternates), so both sides of a ratio see the
same machine load. The speedup is the median over repetitions of ``(s/image at batch 1) / (s/image at batch B)``.

Every measurement runs exactly ``--iterations`` DAG steps per image: the objective's active set is recomputed each
step (as DAG does) and then reset to every target, and no image is reported done. Each step therefore costs what
DAG's first step costs (every target active: an upper bound of a real run, whose active set shrinks), whatever the
victim's weights. The objectives (dense proposals, target selection) are built outside the timed window.

Example::

    .venv/bin/python -m benchmarks.dag --threads 1                      # a few minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.dag --victims segmenter --repeats 1
    .venv/bin/python -m benchmarks.dag --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness import add_device_option, add_threads_option, start, sync_device, write_report
from modules.attacks.dag import DAG
from modules.attacks.protocol import Objective
from modules.detection import DetectionModule, build_detector
from modules.segmentation import SegmentationModule, build_segmenter
from modules.victims.dense import DenseObjective, rows_list
from modules.victims.detector import DetectorObjective
from modules.victims.segmenter import SegmenterObjective

DEFAULT_OUT = Path("benchmarks/results/dag.json")
VICTIMS = ("detector", "segmenter")
NUM_CLASSES = 6  # the shapes data: five categories and the background
OBJECTS = 3  # rectangles per synthetic image


class FixedIterations(Objective):
    """A dense objective that keeps every target active and never reports an image done (a fixed step count).

    Args:
        inner: The objective whose loss and active-set computation are timed.
    """

    def __init__(self, inner: DenseObjective) -> None:
        self.inner = inner
        self.module = inner.module  # whose train / eval mode the attack sets

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The inner loss. Shape: ``images`` ``(R, C, H, W)``; returns ``(R,)``."""
        return self.inner.loss(images, rows)

    def refresh(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the active set as DAG does (its cost is timed), then make every target active again.

        Shape:
            ``images``: ``(R, C, H, W)``; returns ``(R,)`` bool, all false.
        """
        self.inner.refresh(images, rows)
        picked = rows_list(rows, self.inner.size)
        for r in picked:
            self.inner.active[r] = torch.ones_like(self.inner.active[r])
        return torch.zeros(len(picked), dtype=torch.bool)


def synthetic_scenes(
    count: int, size: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Filled rectangles of random classes and colours on grey, with their boxes, labels and semantic masks.

    Shape:
        images ``(count, 3, size, size)`` in [0, 1]; boxes ``(OBJECTS, 4)`` (x0, y0, x1, y1) and labels
        ``(OBJECTS,)`` per image; masks ``(count, size, size)`` long (0 background, later rectangles on top).
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((count, 3, size, size), 0.5)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    boxes, labels = [], []
    for i in range(count):
        sides = torch.randint(size // 6, size // 2, (OBJECTS, 2), generator=gen)
        corners = (torch.rand(OBJECTS, 2, generator=gen) * (size - sides)).long()
        classes = torch.randint(1, NUM_CLASSES, (OBJECTS,), generator=gen)
        for (x, y), (w, h), c in zip(corners.tolist(), sides.tolist(), classes.tolist(), strict=True):
            images[i, :, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=gen)
            masks[i, y : y + h, x : x + w] = c
        boxes.append(torch.cat([corners, corners + sides], 1).float())
        labels.append(classes)
    return images, boxes, labels, masks


def build_victim(victim: str, checkpoint: str | None, size: int) -> nn.Module:
    """The torchvision network of a victim: the ``small`` preset (random init) or a checkpoint's."""
    if checkpoint:
        module_type = DetectionModule if victim == "detector" else SegmentationModule
        return module_type.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, weights=None).model
    return build_detector("small", NUM_CLASSES, size) if victim == "detector" else build_segmenter("small", NUM_CLASSES)


def objective_factory(
    victim: str, model: nn.Module, boxes: list[torch.Tensor], labels: list[torch.Tensor], masks: torch.Tensor
) -> Callable[[torch.Tensor, slice], DenseObjective]:
    """Builds the victim's DAG objective for a slice of the scenes (image ``i`` keeps seed ``i`` in every batch)."""

    def build(images: torch.Tensor, part: slice) -> DenseObjective:
        seeds = list(range(part.start, part.stop))
        if victim == "detector":
            return DetectorObjective(model, images, boxes[part], labels[part], seeds=seeds)
        return SegmenterObjective(model, images, masks[part].to(images.device), seeds=seeds)

    return build


def _timed(attack: DAG, objective: DenseObjective, images: torch.Tensor) -> float:
    sync_device(images.device)
    begin = time.perf_counter()
    attack(FixedIterations(objective), images)
    sync_device(images.device)
    return time.perf_counter() - begin


def bench_victim(victim: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved batch-1 and batch-B timings of one victim."""
    torch.manual_seed(args.seed)
    checkpoint = args.detector_ckpt if victim == "detector" else args.segmenter_ckpt
    model = build_victim(victim, checkpoint, args.image_size).to(device).eval()
    images, boxes, labels, masks = synthetic_scenes(args.batch_large, args.image_size, args.seed)
    images = images.to(device)
    build = objective_factory(victim, model, boxes, labels, masks)
    attack = DAG(max_iterations=args.iterations)
    whole = slice(0, args.batch_large)
    targets = build(images, whole).target_counts()
    _timed(DAG(max_iterations=2), build(images[:2], slice(0, 2)), images[:2])  # warm-up
    single, batched, ratios = [], [], []
    for repeat in range(args.repeats):
        order = ("single", "batched") if repeat % 2 == 0 else ("batched", "single")
        seconds: dict[str, float] = {}
        for side in order:
            if side == "single":
                parts = [slice(i, i + 1) for i in range(args.batch_large)]
                total = sum(_timed(attack, build(images[p], p), images[p]) for p in parts)
            else:
                total = _timed(attack, build(images, whole), images)
            seconds[side] = total / args.batch_large
        single.append(seconds["single"])
        batched.append(seconds["batched"])
        ratios.append(seconds["single"] / seconds["batched"])
        print(
            f"  {victim} repeat {repeat}: {seconds['single']:.2f} s/image at batch 1, {seconds['batched']:.2f} "
            f"s/image at batch {args.batch_large}, speedup {ratios[-1]:.2f}x",
            flush=True,
        )
    return {
        "victim": victim,
        "weights": checkpoint or "small preset, random init",
        "image_size": args.image_size,
        "iterations": args.iterations,
        "targets_per_image": float(targets.float().mean()),
        "seconds_per_image_batch1": statistics.median(single),
        f"seconds_per_image_batch{args.batch_large}": statistics.median(batched),
        "seconds_per_iteration_batch1": statistics.median(single) / args.iterations,
        "speedup": statistics.median(ratios),
        "speedup_runs": ratios,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=VICTIMS)
    parser.add_argument("--iterations", type=int, default=10, help="DAG steps per image in every measurement")
    parser.add_argument("--batch-large", type=int, default=16, help="the batched side's batch size")
    parser.add_argument("--image-size", type=int, default=128, help="the presets' input side (shapes upsampled)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--detector-ckpt", default=None, help="a detector checkpoint (default: small, random init)")
    parser.add_argument("--segmenter-ckpt", default=None, help="a segmenter checkpoint (default: small, random init)")
    add_device_option(parser)
    add_threads_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_large < 2 or args.repeats < 1 or args.image_size < 32:
        parser.error("--iterations and --repeats must be >= 1, --batch-large >= 2 and --image-size >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, machine = start(args)
    print(f"machine: {machine}", flush=True)
    began = time.perf_counter()
    results = [bench_victim(victim, args, device) for victim in args.victims]
    b = args.batch_large
    print(f"| victim | s/image batch 1 | s/image batch {b} | speedup | targets/image | iterations |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['victim']} | {r['seconds_per_image_batch1']:.2f} | {r[f'seconds_per_image_batch{b}']:.2f} "
            f"| {r['speedup']:.2f}x | {r['targets_per_image']:.0f} | {r['iterations']} |"
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    settings["wall_s"] = time.perf_counter() - began
    return write_report("dag", argv, machine, results, args.out, settings)


if __name__ == "__main__":
    main()
