"""Clean training-step time of the ``tiny`` and ``base`` presets, and Lightning's overhead over a bare PyTorch loop.

For each preset one randomly initialised :class:`~modules.captioning.CaptioningModule` (fixed seed) is deep-copied
twice and trained on the same pre-built synthetic batches in two ways:

* **bare**: ``opt.zero_grad(); loss = captioner(pixel_values, labels).loss; loss.backward(); opt.step();
  sched.step()`` with the optimizer and scheduler of ``CaptioningModule.configure_optimizers`` (see
  :class:`BareLoop` for why ``zero_grad`` comes first);
* **Lightning**: ``Trainer.fit`` of the module on a DataLoader over the same pre-collated batches.

The two run in lockstep, step by step (bare, Lightning, Lightning, bare, bare, ...): a callback times Lightning's
step from ``on_train_batch_start`` to ``on_train_batch_end`` and runs the paired bare step just outside that window.
On a shared machine the load changes from second to second, so pairing the steps is what makes the ratio
trustworthy; both runs also draw the same dropout masks, and the script checks that their losses agree.

Reported per preset, over several repetitions (fresh copies each time), warm-up steps excluded from step times:

* step ms: median bare step and median Lightning hook-to-hook step (forward, backward, optimizer and scheduler
  step, ``self.log``); ratio = median over step pairs of Lightning / bare (goal <= 1.05);
* end to end ms: bare setup (optimizer creation) plus all bare steps, and ``Trainer.fit`` wall time less the bare
  steps run inside it, each divided by all steps (warm-up included, so one-time fit setup is amortised over them);
  ratio = Lightning / bare per repetition, then the median.

Example (``--threads 1`` on a CPU shared with other jobs, see ``--help``)::

    .venv/bin/python -m benchmarks.train_step --presets tiny base --threads 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from benchmarks.harness import (
    add_device_option,
    add_threads_option,
    quartiles,
    require_at_least,
    start,
    sync_device,
    write_report,
)
from benchmarks.synthetic import LABEL_TOKENS, PrebuiltBatches, build_batches, build_module, build_tokenizer
from modules.captioning import CaptioningModule

GOAL_RATIO = 1.05
DEFAULT_OUT = Path("benchmarks/results/train_step.json")
IMAGE_SIZES = {"tiny": 64, "base": 224}
# Per-preset defaults sized so that tiny + base finish in under 10 minutes on 2 shared CPU cores.
DEFAULT_STEPS = {"tiny": 20, "base": 4}
DEFAULT_WARMUP = {"tiny": 3, "base": 1}
DEFAULT_REPEATS = {"tiny": 5, "base": 3}


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


class BareLoop:
    """The bare PyTorch training loop, advanced one step at a time.

    Each step is ``opt.zero_grad(); loss = captioner(pixel_values, labels).loss; loss.backward(); opt.step();
    sched.step()``. ``zero_grad`` comes first, where Lightning's automatic optimization calls it, so that each
    model's gradients live exactly as long in both loops: run in lockstep, a loop that freed its gradients at the
    end of its step would run while the other model's gradients are still allocated, but not the other way round,
    which on the ``base`` preset made the bare step ~5% slower. The loop keeps its own random-number stream
    (dropout), seeded like the global one before ``Trainer.fit``, so it draws the same dropout masks as the
    Lightning run and computes the same losses.

    Args:
        template: Untrained module (copied, never modified).
        device: Training device.
        total_steps: Run length the learning-rate schedule is built for.
        seed: Seed of the loop's random-number stream.

    Attributes:
        setup_ms: Time to put the captioner in training mode and build the optimizer and scheduler.
    """

    def __init__(self, template: CaptioningModule, device: torch.device, total_steps: int, seed: int) -> None:
        self.device = device
        self.module = copy.deepcopy(template).to(device)
        self.captioner = self.module.captioner
        self._rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.manual_seed(seed)
            self._rng = self._get_rng()
        sync_device(device)
        start = time.perf_counter()
        self.captioner.train()
        self.opt, self.sched = module_optimizers(self.module, total_steps)
        sync_device(device)
        self.setup_ms = (time.perf_counter() - start) * 1e3

    def _get_rng(self) -> list[torch.Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    def _set_rng(self, states: list[torch.Tensor]) -> None:
        torch.set_rng_state(states[0])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(states[1], self.device)

    def step(self, batch: dict[str, Any]) -> tuple[float, torch.Tensor]:
        """One training step on ``batch``.

        Returns:
            The step time in milliseconds (device synchronised) and the detached loss.
        """
        with torch.random.fork_rng(devices=self._rng_devices):
            self._set_rng(self._rng)
            sync_device(self.device)
            start = time.perf_counter()
            self.opt.zero_grad()
            loss = self.captioner(batch["pixel_values"], batch["labels"]).loss
            loss.backward()
            self.opt.step()
            self.sched.step()
            sync_device(self.device)
            elapsed = (time.perf_counter() - start) * 1e3
            self._rng = self._get_rng()
        return elapsed, loss.detach()


class PairedTimer(L.Callback):
    """Times every Lightning training batch and runs one bare-loop step beside it.

    Lightning's step is the time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    optimizer and scheduler step, ``self.log``). The bare step on the same batch runs just before it on even
    batches and just after it on odd ones (B L L B B L ...), outside Lightning's timed window, so both variants of
    a pair see the same machine load.

    Args:
        bare: The bare loop stepped in lockstep.
        device: Training device; CUDA is synchronised before each reading.
    """

    def __init__(self, bare: BareLoop, device: torch.device) -> None:
        self.bare = bare
        self.device = device
        self.lightning_ms: list[float] = []
        self.lightning_losses: list[float] = []
        self.bare_ms: list[float] = []
        self.bare_losses: list[float] = []
        self.outside_ms = 0.0  # wall time spent here on bare steps, to take out of the fit time
        self._start = 0.0

    def _bare_step(self, batch: dict[str, Any]) -> None:
        start = time.perf_counter()
        elapsed, loss = self.bare.step(batch)
        self.bare_ms.append(elapsed)
        self.bare_losses.append(float(loss))
        self.outside_ms += (time.perf_counter() - start) * 1e3

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % 2 == 0:
            self._bare_step(batch)
        sync_device(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sync_device(self.device)
        self.lightning_ms.append((time.perf_counter() - self._start) * 1e3)
        self.lightning_losses.append(float(outputs["loss"]))
        if batch_idx % 2 == 1:
            self._bare_step(batch)


def run_pair(
    template: CaptioningModule,
    batches: Sequence[dict[str, Any]],
    warmup: int,
    steps: int,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """One repetition: ``Trainer.fit`` of a copy of ``template`` with a bare loop on another copy in lockstep.

    Args:
        template: Untrained module (copied, never modified).
        batches: Batches already on ``device``.
        warmup: Untimed first steps (still counted in the end-to-end times).
        steps: Timed steps after warm-up.
        device: Training device.
        seed: Seed of both runs' random-number streams.

    Returns:
        Step times of both variants (after warm-up), end-to-end times per step, and the largest loss difference.
    """
    total = warmup + steps
    bare = BareLoop(template, device, total, seed)
    module = copy.deepcopy(template).to(device)
    timer = PairedTimer(bare, device)
    # batch_size=None: the dataset items are whole batches. A private generator keeps the global random stream
    # (dropout) untouched by the loader, so the Lightning run draws the same masks as the bare loop.
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
        torch.manual_seed(seed)
        sync_device(device)
        fit_start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        sync_device(device)
        fit_ms = (time.perf_counter() - fit_start) * 1e3
    if len(timer.lightning_ms) != total or len(timer.bare_ms) != total:
        raise RuntimeError(f"ran {len(timer.lightning_ms)} Lightning / {len(timer.bare_ms)} bare steps, not {total}")
    lightning_ms, bare_ms = timer.lightning_ms[warmup:], timer.bare_ms[warmup:]
    result = {
        "bare_step_ms": bare_ms,
        "lightning_step_ms": lightning_ms,
        "pair_ratios": [lt / bt for lt, bt in zip(lightning_ms, bare_ms, strict=True)],
        "bare_end_to_end_ms": (bare.setup_ms + sum(timer.bare_ms)) / total,
        "lightning_end_to_end_ms": (fit_ms - timer.outside_ms) / total,
        # Fit time outside the timed steps (setup, data fetching, hooks, teardown), per step.
        "lightning_loop_ms": (fit_ms - timer.outside_ms - sum(timer.lightning_ms)) / total,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(timer.bare_losses, timer.lightning_losses, strict=True)),
    }
    del bare, module, trainer, loader, timer
    gc.collect()
    return result


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
    """Repeated paired bare / Lightning runs of one preset.

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
    reps: list[dict[str, Any]] = []
    for rep in range(repeats):
        row = run_pair(template, batches, warmup, steps, device, seed)
        row["ratio_step"] = statistics.median(row["pair_ratios"])
        row["ratio_end_to_end"] = row["lightning_end_to_end_ms"] / row["bare_end_to_end_ms"]
        reps.append(row)
        print(
            f"[{preset}] rep {rep + 1}/{repeats}: step {statistics.median(row['bare_step_ms']):.1f} / "
            f"{statistics.median(row['lightning_step_ms']):.1f} ms (x{row['ratio_step']:.3f}), end to end "
            f"{row['bare_end_to_end_ms']:.1f} / {row['lightning_end_to_end_ms']:.1f} ms "
            f"(x{row['ratio_end_to_end']:.3f}), Lightning outside steps {row['lightning_loop_ms']:.1f} ms/step, "
            f"|loss diff| {row['max_abs_loss_diff']:.1e}",
            flush=True,
        )
    del template, batches
    gc.collect()
    pairs = [r for rep in reps for r in rep["pair_ratios"]]
    e2e_ratios = [rep["ratio_end_to_end"] for rep in reps]
    ratio_step = statistics.median(pairs)
    q1, q3 = quartiles(pairs)
    ratio_e2e = statistics.median(e2e_ratios)
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
        "bare_step_ms": statistics.median(t for rep in reps for t in rep["bare_step_ms"]),
        "lightning_step_ms": statistics.median(t for rep in reps for t in rep["lightning_step_ms"]),
        "ratio_step": ratio_step,
        "ratio_step_iqr": [q1, q3],
        "overhead_step_ms": statistics.median(
            lt - bt for rep in reps for lt, bt in zip(rep["lightning_step_ms"], rep["bare_step_ms"], strict=True)
        ),
        "bare_end_to_end_ms": statistics.median(rep["bare_end_to_end_ms"] for rep in reps),
        "lightning_end_to_end_ms": statistics.median(rep["lightning_end_to_end_ms"] for rep in reps),
        "ratio_end_to_end": ratio_e2e,
        "lightning_loop_ms": statistics.median(rep["lightning_loop_ms"] for rep in reps),
        "ratio_end_to_end_range": [min(e2e_ratios), max(e2e_ratios)],
        "goal_ratio": GOAL_RATIO,
        "goal_met_step": ratio_step <= GOAL_RATIO,
        # Whether the verdict holds for the middle half of the step pairs too, not only for their median.
        "goal_verdict_clear": q3 <= GOAL_RATIO if ratio_step <= GOAL_RATIO else q1 > GOAL_RATIO,
        "goal_met_end_to_end": ratio_e2e <= GOAL_RATIO,
        "max_abs_loss_diff": max(rep["max_abs_loss_diff"] for rep in reps),
        "repetitions": reps,
    }


def prime(tokenizer: PreTrainedTokenizerFast, device: torch.device, seed: int) -> None:
    """One untimed paired step on a small model, so one-time costs (lazy imports, first Trainer) are paid."""
    template = build_module(tokenizer, "tiny", 32, seed)
    run_pair(template, build_batches(tokenizer, 2, 32, seed, device), 0, 1, device, seed)


def format_table(machine: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the medians, headed by the machine and followed by a legend."""
    head = (
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, lightning {machine['lightning']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
    )
    columns = (
        f"{'preset':<6} {'px':>4} {'batch':>5} {'params':>7} | {'bare ms':>9} {'Lightn. ms':>10} {'ratio':>6} "
        f"{'IQR':>11} {'+ms':>6} | {'bare e2e':>9} {'Light. e2e':>10} {'ratio':>6} {'range':>11} {'outside':>7} "
        f"| goal <= {GOAL_RATIO}"
    )
    lines = [head, columns, "-" * len(columns)]
    for r in results:
        q1, q3 = r["ratio_step_iqr"]
        lo, hi = r["ratio_end_to_end_range"]
        verdict = "met" if r["goal_met_step"] else "NOT met"
        verdict += "" if r["goal_verdict_clear"] else " (IQR spans the goal)"
        verdict += "; e2e " + ("met" if r["goal_met_end_to_end"] else "not met")
        step = (
            f"{r['bare_step_ms']:>9.1f} {r['lightning_step_ms']:>10.1f} {r['ratio_step']:>6.3f} "
            f"{f'{q1:.3f}-{q3:.3f}':>11} {r['overhead_step_ms']:>6.1f}"
        )
        e2e = (
            f"{r['bare_end_to_end_ms']:>9.1f} {r['lightning_end_to_end_ms']:>10.1f} {r['ratio_end_to_end']:>6.3f} "
            f"{f'{lo:.3f}-{hi:.3f}':>11} {r['lightning_loop_ms']:>7.1f}"
        )
        shape = f"{r['preset']:<6} {r['image_size']:>4} {r['batch_size']:>5} {r['parameters'] / 1e6:>6.1f}M"
        lines.append(f"{shape} | {step} | {e2e} | {verdict}")
    lines += [
        "step: median step time (ms); ratio = Lightning / bare, median over step pairs (IQR of the pairs);",
        "  +ms = median of Lightning - bare over the pairs",
        "e2e: wall time per step (ms), warm-up included, median over repetitions (range of their ratios);",
        "  outside = Lightning fit time outside the timed steps (setup, data fetching, hooks), per step",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(IMAGE_SIZES), default=["tiny", "base"])
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, help=f"untimed first steps per run (default: {DEFAULT_WARMUP})")
    parser.add_argument("--repeats", type=int, help=f"repetitions, each on fresh copies (default: {DEFAULT_REPEATS})")
    parser.add_argument("--batch-size-tiny", type=int, default=64)
    parser.add_argument("--batch-size-base", type=int, default=4)
    add_device_option(parser)
    add_threads_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("steps", "repeats", "threads"), 1)
    require_at_least(parser, args, ("warmup",), 0)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and write the JSON results.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The results written to ``--out``.
    """
    args = parse_args(argv)
    device, machine = start(args)
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
    return write_report("train_step", argv, machine, results, args.out)


if __name__ == "__main__":
    main()
