"""Adversarial-training step time relative to a clean step, all variants measured in one run.

Variants (``tiny`` preset, 64 px, batch 64 by default, FGSM/PGD budget 0.05):

* ``clean``: plain ``Trainer.fit`` step, the reference;
* ``fgsm-adv``: :class:`~callbacks.AdversarialTraining` ``mode="adversarial"``, FGSM (goal <= 2.1x, floor 2x: the
  attack costs one forward and backward pass, then the step trains on the adversarial batch);
* ``fgsm-mixed``: ``mode="mixed"``, FGSM (goal <= 3.1x, floor 3x: one attack pass, then a step on the doubled
  clean + adversarial batch);
* ``pgd-k``: ``mode="adversarial"``, PGD with ``k`` steps (floor k + 1; no goal, reported for scale);
* ``fgsm-mixed+freeze-enc`` / ``fgsm-mixed+freeze-dec``: ``fgsm-mixed`` with :class:`~callbacks.FreezeEncoder` /
  :class:`~callbacks.FreezeDecoder` (goal: cheaper than ``fgsm-mixed``).

Each variant is a real ``Trainer.fit`` (``max_steps``, no logger, checkpointing, progress bar or validation) on a
DataLoader over the same pre-built batches, and its step is timed by a callback from ``on_train_batch_start`` to
``on_train_batch_end``. Lightning calls callback hooks in ``trainer.callbacks`` order, before the LightningModule's
own hook, and the timer is registered first, so :class:`~callbacks.AdversarialTraining`'s ``on_train_batch_start``
(the attack) falls inside the timed window; the script checks this at every step (the batch the timer sees at the
start is still clean, at the end it is the adversarial or doubled batch) and refuses to report otherwise.

Interleaving: the variants of one repetition run in one process, each ``Trainer.fit`` in its own thread, and pass a
baton so that exactly one of them computes at a time, one step each in turn (clean, fgsm-adv, ..., clean,
fgsm-adv, ...). On a shared machine whose load changes from second to second, every round of steps sees nearly the
same load, so the ratio of a variant's step to the clean step of the same round is trustworthy even when absolute
times drift. The ring order is rotated from one repetition to the next, and every repetition builds fresh models
(same seed). Reported per variant: median step ms, and the ratio to clean as the median over rounds of the per-round
ratios, with their interquartile range; warm-up rounds are excluded.

Example::

    .venv/bin/python -m benchmarks.adversarial_step --threads 1   # about 6 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.harness import (
    add_device_option,
    add_threads_option,
    quartiles,
    require_at_least,
    start,
    sync_device,
    write_report,
)
from benchmarks.synthetic import PrebuiltBatches, build_batches, build_module, build_tokenizer
from callbacks import AdversarialTraining, FreezeDecoder, FreezeEncoder
from modules.captioning import CaptioningModule

DEFAULT_OUT = Path("benchmarks/results/adversarial_step.json")
PRESET = "tiny"
IMAGE_SIZE = 64
EPSILON = 0.05
BATCH_WAIT_S = 600.0  # a variant waiting longer than this for its turn means another thread hung


@dataclass(frozen=True)
class Variant:
    """One way of training, timed against the clean step.

    Attributes:
        name: Short name used in the table and the JSON.
        description: What the variant does.
        mode: ``AdversarialTraining`` mode, or ``None`` for clean training.
        attack: Attack name for ``AdversarialTraining``.
        attack_kwargs: Attack options.
        freeze: ``"encoder"``, ``"decoder"`` or ``None``.
        goal: Largest acceptable ratio to the clean step, or ``None``.
        floor: Ratio expected from counting forward + backward passes alone.
        compare_to: Name of a variant this one must be cheaper than (its goal), or ``None``.
    """

    name: str
    description: str
    mode: str | None = None
    attack: str = "fgsm"
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze: str | None = None
    goal: float | None = None
    floor: float | None = None
    compare_to: str | None = None

    def callbacks(self) -> list[L.Callback]:
        """The robucap callbacks of this variant (the timer is added in front of them)."""
        found: list[L.Callback] = []
        if self.mode is not None:
            found.append(
                AdversarialTraining(
                    mode=self.mode, attack=self.attack, epsilon=EPSILON, attack_kwargs=dict(self.attack_kwargs)
                )
            )
        if self.freeze == "encoder":
            found.append(FreezeEncoder())
        elif self.freeze == "decoder":
            found.append(FreezeDecoder())
        return found

    def batch_factor(self) -> int:
        """How many times larger the trained batch is than the loaded one."""
        return 2 if self.mode == "mixed" else 1


def build_variants(pgd_steps: int) -> list[Variant]:
    """The clean reference and the adversarial variants, in table order.

    Args:
        pgd_steps: Steps of the PGD variant.
    """
    return [
        Variant("clean", "clean training step (reference)", floor=1.0),
        Variant("fgsm-adv", "FGSM, adversarial only", mode="adversarial", goal=2.1, floor=2.0),
        Variant("fgsm-mixed", "FGSM, mixed clean + adversarial", mode="mixed", goal=3.1, floor=3.0),
        Variant(
            f"pgd-{pgd_steps}",
            f"PGD-{pgd_steps}, adversarial only",
            mode="adversarial",
            attack="pgd",
            attack_kwargs={"steps": pgd_steps},
            floor=float(pgd_steps + 1),
        ),
        Variant(
            "fgsm-mixed+freeze-enc",
            "FGSM mixed, FreezeEncoder",
            mode="mixed",
            freeze="encoder",
            compare_to="fgsm-mixed",
        ),
        Variant(
            "fgsm-mixed+freeze-dec",
            "FGSM mixed, FreezeDecoder",
            mode="mixed",
            freeze="decoder",
            compare_to="fgsm-mixed",
        ),
    ]


class CopiedBatches(PrebuiltBatches):
    """Serves shallow copies of pre-collated batches (use with ``DataLoader(batch_size=None)``), cycling.

    ``AdversarialTraining`` replaces entries of the batch dict in place, so each step gets its own dict; the tensors
    are shared and never modified.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(super().__getitem__(index))


class BenchmarkAborted(RuntimeError):
    """Another variant's thread failed, so this one stops too."""


class Baton:
    """Lets exactly one of several threads run a training step at a time, in a fixed ring order.

    Args:
        order: Thread ids in ring order; the first one starts.
    """

    def __init__(self, order: Sequence[int]) -> None:
        self._cond = threading.Condition()
        self._active = list(order)
        self._turn = self._active[0]
        self._arrived = 0
        self._expected = len(self._active)
        self.error: BaseException | None = None

    def _wait(self, predicate: Callable[[], bool]) -> None:
        if not self._cond.wait_for(lambda: predicate() or self.error is not None, timeout=BATCH_WAIT_S):
            self.fail(TimeoutError(f"no turn within {BATCH_WAIT_S:.0f} s"))
        if self.error is not None:
            raise BenchmarkAborted("another variant failed") from self.error

    def arrive(self) -> None:
        """Barrier: wait until every thread has finished its fit setup, so no setup overlaps a timed step."""
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()
            self._wait(lambda: self._arrived >= self._expected)

    def wait_turn(self, me: int) -> None:
        """Block until it is ``me``'s turn."""
        with self._cond:
            self._wait(lambda: self._turn == me)

    def pass_turn(self, me: int) -> None:
        """Hand the turn to the next thread in the ring (``me`` must hold it)."""
        with self._cond:
            if self._turn == me and me in self._active:
                self._turn = self._active[(self._active.index(me) + 1) % len(self._active)]
            self._cond.notify_all()

    def leave(self, me: int) -> None:
        """Leave the ring (passing the turn on if ``me`` holds it). Idempotent."""
        with self._cond:
            if me in self._active:
                if self._turn == me and len(self._active) > 1:
                    self._turn = self._active[(self._active.index(me) + 1) % len(self._active)]
                self._active.remove(me)
            self._arrived = max(self._arrived, self._expected)  # a thread failing before the barrier frees it
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Record the first failure and wake every thread, which then aborts."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()


class StepTimer(L.Callback):
    """Times each training step from ``on_train_batch_start`` to ``on_train_batch_end``, taking turns with others.

    Must come first in ``trainer.callbacks`` so that the attack (``AdversarialTraining.on_train_batch_start``)
    runs inside the timed window; checked at train start and, through the batch it sees, at every step.

    Args:
        me: This variant's id in the baton ring.
        baton: Shared turn-taking.
        variant: The variant timed (for the per-step checks).
        batch_size: Images per loaded batch.
        device: Training device; CUDA is synchronised before each reading.
    """

    def __init__(self, me: int, baton: Baton, variant: Variant, batch_size: int, device: torch.device) -> None:
        self.me = me
        self.baton = baton
        self.variant = variant
        self.batch_size = batch_size
        self.device = device
        self.step_ms: list[float] = []
        self.losses: list[float] = []
        self._holding = False
        self._start = 0.0
        self._clean_images: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        position = trainer.callbacks.index(self)
        for index, callback in enumerate(trainer.callbacks):
            if isinstance(callback, AdversarialTraining) and index < position:
                raise RuntimeError("the step timer must run before AdversarialTraining to time the attack")
        self.baton.arrive()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._holding:
            # Passed here, not at the previous step's end, so this thread's between-step work (loop bookkeeping,
            # fetching this batch) never overlaps another variant's timed step.
            self.baton.pass_turn(self.me)
        self.baton.wait_turn(self.me)
        self._holding = True
        images = batch["pixel_values"]
        if images.shape[0] != self.batch_size:
            raise RuntimeError(f"{self.variant.name}: the timer saw a batch of {images.shape[0]}, not the clean one")
        self._clean_images = images
        sync_device(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sync_device(self.device)
        self.step_ms.append((time.perf_counter() - self._start) * 1e3)
        self.losses.append(float(outputs["loss"]))
        images = batch["pixel_values"]
        expected = self.batch_size * self.variant.batch_factor()
        attacked = images is not self._clean_images
        if images.shape[0] != expected or attacked != (self.variant.mode is not None):
            raise RuntimeError(
                f"{self.variant.name}: trained on {images.shape[0]} images (expected {expected}), "
                f"attacked={attacked}: the attack did not run inside the timed window as expected"
            )
        self._clean_images = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.baton.leave(self.me)
        self._holding = False


def _fit(trainer: L.Trainer, module: CaptioningModule, loader: DataLoader, baton: Baton, me: int) -> None:
    try:
        trainer.fit(module, train_dataloaders=loader)
    except BaseException as error:  # noqa: BLE001 - reported by the main thread
        baton.fail(error)
    finally:
        baton.leave(me)


def run_repetition(
    template: CaptioningModule,
    variants: Sequence[Variant],
    order: Sequence[int],
    batches: Sequence[dict[str, Any]],
    batch_size: int,
    total_steps: int,
    device: torch.device,
    seed: int,
) -> list[StepTimer]:
    """One repetition: every variant's ``Trainer.fit`` on a fresh copy of ``template``, stepping in turn.

    Args:
        template: Untrained module (copied, never modified).
        variants: The variants.
        order: Ring order (indices into ``variants``).
        batches: Batches already on ``device``.
        batch_size: Images per batch.
        total_steps: Steps per fit, warm-up included.
        device: Training device.
        seed: Global seed set before the fits start (dropout, PGD random start).

    Returns:
        The timers, indexed like ``variants``, each holding ``total_steps`` step times.

    Raises:
        RuntimeError: A fit failed or a timing check did not hold.
    """
    baton = Baton(order)
    timers: list[StepTimer] = []
    threads: list[threading.Thread] = []
    with tempfile.TemporaryDirectory(prefix="robucap-bench-") as root:
        for me, variant in enumerate(variants):
            timer = StepTimer(me, baton, variant, batch_size, device)
            timers.append(timer)
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                max_steps=total_steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                callbacks=[timer, *variant.callbacks()],
                default_root_dir=f"{root}/{variant.name}",
            )
            loader = DataLoader(
                CopiedBatches(batches, total_steps),
                batch_size=None,
                shuffle=False,
                num_workers=0,
                generator=torch.Generator(),
            )
            module = copy.deepcopy(template).to(device)
            threads.append(
                threading.Thread(
                    target=_fit, args=(trainer, module, loader, baton, me), name=f"fit-{variant.name}", daemon=True
                )
            )
        torch.manual_seed(seed)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if baton.error is not None:
        raise RuntimeError(f"a variant failed: {baton.error!r}") from baton.error
    for variant, timer in zip(variants, timers, strict=True):
        if len(timer.step_ms) != total_steps:
            raise RuntimeError(f"{variant.name} ran {len(timer.step_ms)} steps, not {total_steps}")
    return timers


def summarise(
    variants: Sequence[Variant], steps: dict[str, list[list[float]]], losses: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """Per-variant medians, ratios to clean (per round) and goal verdicts.

    Args:
        variants: The variants, ``clean`` first.
        steps: Per variant, per repetition, the timed step ms (warm-up excluded), rounds aligned across variants.
        losses: Per variant, every step's loss.

    Returns:
        One JSON-ready row per variant.
    """
    clean = steps["clean"]
    rows = []
    for variant in variants:
        mine = steps[variant.name]
        ratios = [
            t / c for rep, clean_rep in zip(mine, clean, strict=True) for t, c in zip(rep, clean_rep, strict=True)
        ]
        rep_ratios = [
            statistics.median(t / c for t, c in zip(rep, clean_rep, strict=True))
            for rep, clean_rep in zip(mine, clean, strict=True)
        ]
        ratio = statistics.median(ratios)
        q1, q3 = quartiles(ratios)
        row: dict[str, Any] = {
            "variant": variant.name,
            "description": variant.description,
            "mode": variant.mode,
            "attack": variant.attack if variant.mode else None,
            "attack_kwargs": variant.attack_kwargs if variant.mode else None,
            "freeze": variant.freeze,
            "step_ms": statistics.median(t for rep in mine for t in rep),
            "step_ms_iqr": quartiles([t for rep in mine for t in rep]),
            "ratio_to_clean": ratio,
            "ratio_iqr": [q1, q3],
            "ratio_per_repetition": rep_ratios,
            "floor": variant.floor,
            "goal": None,
            "goal_met": None,
            "goal_verdict_clear": None,
            "max_abs_loss": max(abs(x) for x in losses[variant.name]),
            "step_ms_per_repetition": mine,
        }
        if variant.goal is not None:
            row["goal"] = f"<= {variant.goal}x clean"
            row["goal_met"] = ratio <= variant.goal
            row["goal_verdict_clear"] = q3 <= variant.goal if ratio <= variant.goal else q1 > variant.goal
        if variant.compare_to is not None:
            other = steps[variant.compare_to]
            rel = [t / o for rep, o_rep in zip(mine, other, strict=True) for t, o in zip(rep, o_rep, strict=True)]
            rel_ratio = statistics.median(rel)
            r1, r3 = quartiles(rel)
            row["ratio_to_" + variant.compare_to] = rel_ratio
            row["ratio_to_" + variant.compare_to + "_iqr"] = [r1, r3]
            row["goal"] = f"< {variant.compare_to}"
            row["goal_met"] = rel_ratio < 1.0
            row["goal_verdict_clear"] = r3 < 1.0 if rel_ratio < 1.0 else r1 >= 1.0
        rows.append(row)
    return rows


def format_table(machine: dict[str, Any], config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the medians, headed by the machine and the setup, followed by a legend."""
    head = (
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, lightning {machine['lightning']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
    )
    setup = (
        f"{config['preset']} preset, {config['image_size']} px, batch {config['batch_size']}, epsilon {EPSILON}, "
        f"{config['warmup']} + {config['steps']} steps x {config['repeats']} repetitions"
    )
    columns = (
        f"{'variant':<22} {'step ms':>8} {'x clean':>8} {'IQR':>11} {'per-rep range':>13} {'floor':>5} | "
        f"{'goal':<18} verdict"
    )
    lines = [head, setup, columns, "-" * len(columns)]
    for r in rows:
        q1, q3 = r["ratio_iqr"]
        lo, hi = min(r["ratio_per_repetition"]), max(r["ratio_per_repetition"])
        floor = f"{r['floor']:.0f}x" if r["floor"] is not None else "-"
        verdict = "-"
        if r["goal_met"] is not None:
            verdict = "met" if r["goal_met"] else "NOT met"
            verdict += "" if r["goal_verdict_clear"] else " (IQR spans the goal)"
        for key, value in r.items():
            if key.startswith("ratio_to_") and key != "ratio_to_clean" and not key.endswith("_iqr"):
                a, b = r[key + "_iqr"]
                verdict += f"; x{value:.3f} of {key[len('ratio_to_') :]} (IQR {a:.3f}-{b:.3f})"
        lines.append(
            f"{r['variant']:<22} {r['step_ms']:>8.1f} {r['ratio_to_clean']:>8.3f} {f'{q1:.3f}-{q3:.3f}':>11} "
            f"{f'{lo:.3f}-{hi:.3f}':>13} {floor:>5} | {r['goal'] or '-':<18} {verdict}"
        )
    lines += [
        "step ms: median hook-to-hook step (attack + forward + backward + optimizer step), over all timed steps;",
        "x clean: median over rounds of step / clean step of the same round (IQR of those ratios);",
        "per-rep range: min-max over repetitions of each repetition's median ratio;",
        "floor: forward + backward passes counted in units of a clean step's; an attack pass is cheaper than a",
        "  training pass (input gradient only: no weight gradients, optimizer step or Lightning bookkeeping), so a",
        "  measured ratio can fall below it",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images per loaded batch (default: 64)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant and repetition (default: 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per fit (default: 2)")
    parser.add_argument("--repeats", type=int, default=8, help="repetitions, each on fresh models (default: 8)")
    parser.add_argument("--pgd-steps", type=int, default=3, help="steps of the PGD variant (default: 3)")
    add_device_option(parser)
    add_threads_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("batch_size", "steps", "repeats", "pgd_steps", "threads"), 1)
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
    variants = build_variants(args.pgd_steps)
    total = args.warmup + args.steps
    template = build_module(tokenizer, PRESET, IMAGE_SIZE, args.seed)
    params = sum(p.numel() for p in template.captioner.parameters())
    batches = build_batches(tokenizer, args.batch_size, IMAGE_SIZE, args.seed, device)
    print(
        f"[{PRESET}] {params / 1e6:.2f}M parameters, {IMAGE_SIZE} px, batch {args.batch_size}, "
        f"{args.warmup} + {args.steps} steps x {args.repeats} repetitions, {len(variants)} variants in turn",
        flush=True,
    )
    # One untimed short repetition pays one-time costs (lazy imports, first Trainer, allocator growth).
    run_repetition(template, variants, range(len(variants)), batches, args.batch_size, 1, device, args.seed)
    steps: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    losses: dict[str, list[float]] = {v.name: [] for v in variants}
    orders = []
    wall_start = time.perf_counter()
    for rep in range(args.repeats):
        shift = rep % len(variants)
        order = [*range(shift, len(variants)), *range(shift)]
        orders.append([variants[i].name for i in order])
        timers = run_repetition(template, variants, order, batches, args.batch_size, total, device, args.seed)
        for variant, timer in zip(variants, timers, strict=True):
            steps[variant.name].append(timer.step_ms[args.warmup :])
            losses[variant.name].extend(timer.losses)
        clean_ms = steps["clean"][-1]
        summary = ", ".join(
            f"{v.name} x{statistics.median(t / c for t, c in zip(steps[v.name][-1], clean_ms, strict=True)):.2f}"
            for v in variants[1:]
        )
        clean = statistics.median(clean_ms)
        print(f"rep {rep + 1}/{args.repeats}: clean {clean:.1f} ms; {summary}", flush=True)
        del timers
        gc.collect()
    wall_s = time.perf_counter() - wall_start
    for name, values in losses.items():
        if not all(torch.isfinite(torch.tensor(values))):
            raise RuntimeError(f"{name}: non-finite loss")
    config = {
        "preset": PRESET,
        "image_size": IMAGE_SIZE,
        "batch_size": args.batch_size,
        "parameters": params,
        "epsilon": EPSILON,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pgd_steps": args.pgd_steps,
        "ring_orders": orders,
        "wall_s": wall_s,
    }
    rows = summarise(variants, steps, losses)
    print()
    print(format_table(machine, config, rows))
    return write_report("adversarial_step", argv, machine, rows, args.out, config)


if __name__ == "__main__":
    main()
