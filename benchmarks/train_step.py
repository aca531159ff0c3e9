"""Clean training-step time of the ``tiny`` and ``base`` presets, and Lightning's overhead over a bare PyTorch loop.

For each preset the same randomly initialised :class:`~modules.captioning.CaptioningModule` (one seed, deep-copied)
is trained on the same pre-built synthetic batches in two ways, interleaved over several repetitions:

* **bare**: ``loss = captioner(pixel_values, labels).loss; loss.backward(); opt.step(); sched.step();
  opt.zero_grad()`` with the optimizer and scheduler of ``CaptioningModule.configure_optimizers``;
* **Lightning**: ``Trainer.fit`` of the module on a DataLoader over the same pre-collated batches.

Reported per preset (medians over repetitions, warm-up steps excluded):

* step ms: bare step, and Lightning ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
  optimizer and scheduler step, ``self.log``);
* end to end ms: bare loop wall time (optimizer creation to last step) and ``Trainer.fit`` wall time, each divided
  by the number of steps (warm-up steps included, so one-time fit setup is amortised over them);
* ratio = Lightning / bare, computed within each repetition, then the median (goal <= 1.05).

Timings on a shared machine are noisy: compare the ratios, which are measured side by side, not absolute times
across runs. Example::

    .venv/bin/python benchmarks/train_step.py --presets tiny base
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from datamodules.collate import CaptionCollator
from datamodules.tokenizer import build_word_tokenizer
from modules.captioning import CaptioningModule

GOAL_RATIO = 1.05
DEFAULT_OUT = Path("benchmarks/results/train_step.json")
IMAGE_SIZES = {"tiny": 64, "base": 224}
# Per-preset defaults sized so that tiny + base finish in a few minutes on 2 CPU cores.
DEFAULT_STEPS = {"tiny": 30, "base": 2}
DEFAULT_WARMUP = {"tiny": 5, "base": 1}
DEFAULT_REPEATS = {"tiny": 5, "base": 3}
LABEL_TOKENS = 14  # longest label row, EOS included; shorter captions are padded with -100
DISTINCT_BATCHES = 4  # the loops cycle through this many different batches

# ~50 words: captions of 5 to 15 words, so labels are 6 to 14 tokens long with -100 padding.
_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_THINGS = ("circle", "square", "triangle", "star", "dog", "cat", "car", "ball", "tree", "house", "bird", "boat")
_PLACES = ("left", "right", "top", "bottom", "middle", "corner", "edge")
_VERBS = ("sits", "lies", "stands", "floats", "rests")
_LINKS = ("a", "the", "on", "of", "in", "near", "next", "to", "and", "with", "small", "large", "bright", "dark")


@dataclass
class RunTiming:
    """One training run of one variant.

    Attributes:
        step_ms: Time of each measured (post warm-up) step in milliseconds.
        end_to_end_ms: Wall time of the whole run divided by all its steps (warm-up included), in milliseconds.
        losses: Training loss of every step (warm-up included), to check both loops compute the same thing.
    """

    step_ms: list[float]
    end_to_end_ms: float
    losses: list[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        """Median of :attr:`step_ms`."""
        return statistics.median(self.step_ms)


def synthetic_captions(count: int, seed: int) -> list[str]:
    """Deterministic captions over a vocabulary of about 50 words.

    Args:
        count: Number of captions.
        seed: Seed of the word choices.

    Returns:
        Captions of 5 to 15 words.
    """
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = ["a", rng.choice(_COLORS), rng.choice(_THINGS), rng.choice(_VERBS), "on", "the", rng.choice(_PLACES)]
        extra = rng.randint(-2, 8)
        if extra < 0:
            words = words[:extra]
        else:
            words += [rng.choice(_LINKS + _COLORS + _THINGS) for _ in range(extra)]
        captions.append(" ".join(words))
    return captions


def build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    """Word tokenizer over every word the synthetic captions can use (~50 words plus 4 special tokens)."""
    every_word = " ".join(_COLORS + _THINGS + _PLACES + _VERBS + _LINKS)
    return build_word_tokenizer([every_word, *synthetic_captions(64, seed)])


def build_batches(
    tokenizer: PreTrainedTokenizerFast, batch_size: int, image_size: int, seed: int, device: torch.device
) -> list[dict[str, Any]]:
    """Pre-collated synthetic batches in the batch-dict contract (``pixel_values``, ``input_ids``, ...).

    Args:
        tokenizer: Caption tokenizer.
        batch_size: Images per batch.
        image_size: Image side in pixels.
        seed: Seed of images and captions.
        device: Where the tensors are placed (identically for both loops).

    Returns:
        :data:`DISTINCT_BATCHES` batches with ``pixel_values`` uniform in [0, 1] and labels of up to
        :data:`LABEL_TOKENS` tokens, -100 on padding.
    """
    collate = CaptionCollator(tokenizer, max_tokens=LABEL_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    captions = synthetic_captions(DISTINCT_BATCHES * batch_size, seed + 1)
    batches = []
    for b in range(DISTINCT_BATCHES):
        items = [
            {
                "pixel_values": torch.rand(3, image_size, image_size, generator=generator),
                "caption": captions[b * batch_size + i],
                "image_id": f"synthetic-{b}-{i}",
            }
            for i in range(batch_size)
        ]
        batch = collate(items)
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return batches


class PrebuiltBatches(Dataset):
    """Serves pre-collated batches (use with ``DataLoader(batch_size=None)``), cycling through them.

    Args:
        batches: Batch dicts.
        length: Number of items (training steps) to serve.
    """

    def __init__(self, batches: Sequence[dict[str, Any]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


class StepTimer(L.Callback):
    """Records the time from ``on_train_batch_start`` to ``on_train_batch_end`` of every training batch.

    Args:
        device: Training device; CUDA is synchronised before each reading.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_ms: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _sync(self.device)
        self.step_ms.append((time.perf_counter() - self._start) * 1e3)
        self.losses.append(float(outputs["loss"]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_module(tokenizer: PreTrainedTokenizerFast, preset: str, image_size: int, seed: int) -> CaptioningModule:
    """A randomly initialised module, the same for a given seed."""
    torch.manual_seed(seed)
    return CaptioningModule.with_tokenizer(tokenizer, preset=preset, image_size=image_size)


def module_optimizers(module: CaptioningModule, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and scheduler of ``module.configure_optimizers``, outside a Trainer.

    ``configure_optimizers`` reads the run length from ``trainer.estimated_stepping_batches``; a stand-in gives it
    ``total_steps`` so the bare loop gets exactly the parameter groups and schedule the Trainer gets.
    """
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        config = module.configure_optimizers()
    finally:
        module.trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def run_bare(
    template: CaptioningModule, batches: Sequence[dict[str, Any]], warmup: int, steps: int, device: torch.device
) -> RunTiming:
    """Train a copy of ``template`` with a plain PyTorch loop.

    Args:
        template: Untrained module (copied, never modified).
        batches: Batches already on ``device``.
        warmup: Untimed first steps (still counted in the end-to-end time).
        steps: Timed steps after warm-up.
        device: Training device.
    """
    module = copy.deepcopy(template).to(device)
    captioner = module.captioner
    total = warmup + steps
    step_ms: list[float] = []
    losses: list[torch.Tensor] = []
    torch.manual_seed(0)
    _sync(device)
    run_start = time.perf_counter()
    captioner.train()
    opt, sched = module_optimizers(module, total)
    for index in range(total):
        batch = batches[index % len(batches)]
        _sync(device)
        start = time.perf_counter()
        loss = captioner(batch["pixel_values"], batch["labels"]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        _sync(device)
        if index >= warmup:
            step_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.detach())
    end_to_end = (time.perf_counter() - run_start) * 1e3 / total
    timing = RunTiming(step_ms=step_ms, end_to_end_ms=end_to_end, losses=[float(x) for x in losses])
    del module, captioner, opt, sched, losses
    gc.collect()
    return timing


def run_lightning(
    template: CaptioningModule, batches: Sequence[dict[str, Any]], warmup: int, steps: int, device: torch.device
) -> RunTiming:
    """Train a copy of ``template`` with ``Trainer.fit`` (no logger, checkpoints, progress bar or validation).

    Args:
        template: Untrained module (copied, never modified).
        batches: Batches already on ``device``.
        warmup: Untimed first steps (still counted in the end-to-end time).
        steps: Timed steps after warm-up.
        device: Training device.
    """
    module = copy.deepcopy(template).to(device)
    total = warmup + steps
    timer = StepTimer(device)
    # batch_size=None: the dataset items are whole batches. A private generator keeps the global RNG (dropout)
    # in the same state as in the bare loop, so both loops compute the same losses.
    loader = DataLoader(
        PrebuiltBatches(batches, total), batch_size=None, shuffle=False, num_workers=0, generator=torch.Generator()
    )
    with tempfile.TemporaryDirectory(prefix="robucap-bench-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=total,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
            default_root_dir=root,
        )
        torch.manual_seed(0)
        _sync(device)
        fit_start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        _sync(device)
        end_to_end = (time.perf_counter() - fit_start) * 1e3 / total
    if len(timer.step_ms) != total:
        raise RuntimeError(f"Lightning ran {len(timer.step_ms)} steps, expected {total}")
    timing = RunTiming(step_ms=timer.step_ms[warmup:], end_to_end_ms=end_to_end, losses=timer.losses)
    del module, trainer, loader, timer
    gc.collect()
    return timing


def bench_preset(
    tokenizer: PreTrainedTokenizerFast,
    preset: str,
    batch_size: int,
    steps: int,
    warmup: int,
    repeats: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Interleaved bare / Lightning runs of one preset.

    The order alternates between repetitions (bare first, then Lightning first, ...) so that a slow drift of the
    machine's load does not favour one variant.

    Returns:
        Per-repetition timings and their medians, JSON-ready.
    """
    image_size = IMAGE_SIZES[preset]
    template = build_module(tokenizer, preset, image_size, seed)
    params = sum(p.numel() for p in template.captioner.parameters())
    batches = build_batches(tokenizer, batch_size, image_size, seed, device)
    print(
        f"[{preset}] {params / 1e6:.1f}M parameters, {image_size} px, batch {batch_size}, "
        f"{warmup} + {steps} steps x {repeats} repetitions",
        flush=True,
    )
    runners = {"bare": run_bare, "lightning": run_lightning}
    reps: list[dict[str, Any]] = []
    for rep in range(repeats):
        order = ("bare", "lightning") if rep % 2 == 0 else ("lightning", "bare")
        timings = {name: runners[name](template, batches, warmup, steps, device) for name in order}
        bare, light = timings["bare"], timings["lightning"]
        row = {
            "order": list(order),
            "bare_step_ms": bare.median_step_ms,
            "lightning_step_ms": light.median_step_ms,
            "ratio_step": light.median_step_ms / bare.median_step_ms,
            "bare_end_to_end_ms": bare.end_to_end_ms,
            "lightning_end_to_end_ms": light.end_to_end_ms,
            "ratio_end_to_end": light.end_to_end_ms / bare.end_to_end_ms,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(bare.losses, light.losses, strict=True)),
            "bare_step_ms_all": bare.step_ms,
            "lightning_step_ms_all": light.step_ms,
        }
        reps.append(row)
        print(
            f"[{preset}] rep {rep + 1}/{repeats} ({' then '.join(order)}): "
            f"step {row['bare_step_ms']:.1f} / {row['lightning_step_ms']:.1f} ms (x{row['ratio_step']:.3f}), "
            f"end to end {row['bare_end_to_end_ms']:.1f} / {row['lightning_end_to_end_ms']:.1f} ms "
            f"(x{row['ratio_end_to_end']:.3f}), |loss diff| {row['max_abs_loss_diff']:.1e}",
            flush=True,
        )
    del template, batches
    gc.collect()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in reps)

    ratios_step = [r["ratio_step"] for r in reps]
    ratios_e2e = [r["ratio_end_to_end"] for r in reps]
    return {
        "preset": preset,
        "image_size": image_size,
        "batch_size": batch_size,
        "parameters": params,
        "label_tokens": LABEL_TOKENS,
        "vocab_size": len(tokenizer),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "bare_step_ms": med("bare_step_ms"),
        "lightning_step_ms": med("lightning_step_ms"),
        "ratio_step": med("ratio_step"),
        "ratio_step_range": [min(ratios_step), max(ratios_step)],
        "bare_end_to_end_ms": med("bare_end_to_end_ms"),
        "lightning_end_to_end_ms": med("lightning_end_to_end_ms"),
        "ratio_end_to_end": med("ratio_end_to_end"),
        "ratio_end_to_end_range": [min(ratios_e2e), max(ratios_e2e)],
        "goal_ratio": GOAL_RATIO,
        "goal_met_step": med("ratio_step") <= GOAL_RATIO,
        "goal_met_end_to_end": med("ratio_end_to_end") <= GOAL_RATIO,
        "max_abs_loss_diff": max(r["max_abs_loss_diff"] for r in reps),
        "repetitions": reps,
    }


def prime(tokenizer: PreTrainedTokenizerFast, device: torch.device, seed: int) -> None:
    """One untimed step of each loop on a small model, so one-time costs (lazy imports, first Trainer) are paid."""
    template = build_module(tokenizer, "tiny", 32, seed)
    batches = build_batches(tokenizer, 2, 32, seed, device)
    run_bare(template, batches, 0, 1, device)
    run_lightning(template, batches, 0, 1, device)


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


def format_table(machine: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the medians, headed by the machine."""
    head = (
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, lightning {machine['lightning']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
    )
    columns = (
        f"{'preset':<6} {'px':>4} {'batch':>5} {'params':>7} | {'bare ms':>9} {'Lightning ms':>12} {'ratio':>6} "
        f"{'range':>13} | {'bare e2e':>9} {'Light. e2e':>10} {'ratio':>6} | goal <= {GOAL_RATIO}"
    )
    legend = "ms = median step time; e2e = loop / fit wall time per step; ratio = Lightning / bare"
    lines = [head, legend, columns, "-" * len(columns)]
    for r in results:
        lo, hi = r["ratio_step_range"]
        verdict = "met" if r["goal_met_step"] else "NOT met"
        verdict += " (e2e " + ("met)" if r["goal_met_end_to_end"] else "not met)")
        lines.append(
            f"{r['preset']:<6} {r['image_size']:>4} {r['batch_size']:>5} {r['parameters'] / 1e6:>6.1f}M | "
            f"{r['bare_step_ms']:>9.1f} {r['lightning_step_ms']:>12.1f} {r['ratio_step']:>6.3f} "
            f"{f'{lo:.3f}-{hi:.3f}':>13} | {r['bare_end_to_end_ms']:>9.1f} {r['lightning_end_to_end_ms']:>10.1f} "
            f"{r['ratio_end_to_end']:>6.3f} | {verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(IMAGE_SIZES), default=["tiny", "base"])
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, help=f"untimed first steps per run (default: {DEFAULT_WARMUP})")
    parser.add_argument("--repeats", type=int, help=f"interleaved repetitions (default: {DEFAULT_REPEATS})")
    parser.add_argument("--batch-size-tiny", type=int, default=64)
    parser.add_argument("--batch-size-base", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and write the JSON results.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The results written to ``--out``.
    """
    args = parse_args(argv)
    device = torch.device(args.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    machine = machine_info(device)
    tokenizer = build_tokenizer(args.seed)
    batch_sizes = {"tiny": args.batch_size_tiny, "base": args.batch_size_base}
    prime(tokenizer, device, args.seed)
    results = [
        bench_preset(
            tokenizer,
            preset,
            batch_size=batch_sizes[preset],
            steps=args.steps if args.steps is not None else DEFAULT_STEPS[preset],
            warmup=args.warmup if args.warmup is not None else DEFAULT_WARMUP[preset],
            repeats=args.repeats if args.repeats is not None else DEFAULT_REPEATS[preset],
            seed=args.seed,
            device=device,
        )
        for preset in args.presets
    ]
    print()
    print(format_table(machine, results))
    report = {
        "benchmark": "train_step",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
