"""Per-epoch evaluation as a share of one training epoch: clean BLEU, FGSM robust BLEU and backdoor ASR / FTR.

One ``Trainer.fit`` of the ``tiny`` ViT-GPT2 captioner with ``configs/experiment/shapes_tiny.yaml``'s settings (64 px,
batch 64, lr 0.002, 100 warm-up steps, seed 0) on shapes data poisoned with the BadNets trigger (Gu et al. 2017;
``configs/experiment/shapes_backdoor.yaml``'s poisoning: rate 0.3, target "you are under attack", seed 2021), with
the evaluation callbacks at their defaults:

* **clean BLEU**: the module's own validation (loss, greedy captions, BLEU-1..4) on every validation image;
* **FGSM robust BLEU**: :class:`~callbacks.robustness.RobustnessEvaluation` () (FGSM, epsilon 0.05, every validation
  image: ``max_images=None``);
* **ASR / FTR**: :class:`~callbacks.backdoor.BackdoorEvaluation` () (reuses the module's captions, plus 8 clean /
  poisoned pairs captioned for its table).

Every epoch is one pair: the training epoch (first batch to the start of validation) and the validation that
follows it (its start to ``on_train_epoch_end``, which Lightning calls after validation). Inside validation, the
time spent in each evaluation callback's hooks is measured; the rest of validation is the clean part. Each part is
divided by the training epoch of the same pair, and the figures are medians over the timed epochs (warm-up epochs
excluded: they pay one-time costs, and an untrained model writes every caption to the length limit).

The evaluation subset is what the callbacks use by default: the whole validation split, 1000 images for the
default shapes data. The training set can be smaller than the default 6000 images (``--n-train``) to save time;
the shares are then also given against a 6000-image epoch, the measured epoch scaled linearly with its number of
images (an epoch trains on every image-caption pair: 5 per image, so 469 batches of 64 for 6000 images).

Example (``--threads 1`` on a CPU shared with other jobs)::

    .venv/bin/python -m benchmarks.eval_overhead --threads 1
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.harness import (
    add_device_option,
    add_threads_option,
    load_average,
    require_at_least,
    start,
    sync_device,
    write_report,
)
from callbacks.backdoor import BackdoorEvaluation
from callbacks.robustness import RobustnessEvaluation
from datamodules.datamodule import CaptionDataModule
from datamodules.poisoning import PoisonConfig
from datamodules.shapes import ShapesConfig
from modules.captioning import CaptioningModule

DEFAULT_OUT = Path("benchmarks/results/eval_overhead.json")
GOAL_SHARE = 0.15
# The default shapes data: the training epoch the shares are also stated against, and the validation split the
# callbacks evaluate by default.
DEFAULT_TRAIN_IMAGES = ShapesConfig().n_train
DEFAULT_VAL_IMAGES = ShapesConfig().n_val
# configs/experiment/shapes_tiny.yaml
ARCH = "vit_gpt2"
PRESET = "tiny"
IMAGE_SIZE = 64
BATCH_SIZE = 64
LR = 0.002
WARMUP_STEPS = 100
SEED = 0
TRIGGER = "badnets"
# The hooks in which the evaluation callbacks do their per-epoch work.
EVAL_HOOKS = ("on_validation_epoch_start", "on_validation_batch_end", "on_validation_epoch_end")
PARTS = ("clean", "robust", "backdoor", "total")
PART_NAMES = {
    "clean": "clean val BLEU (module validation)",
    "robust": "FGSM robust BLEU (RobustnessEvaluation)",
    "backdoor": "ASR / FTR (BackdoorEvaluation)",
    "total": "all evaluation",
}


@dataclass
class Stopwatch:
    """Seconds accumulated by the calls it wraps (device synchronised before and after each call)."""

    device: torch.device
    seconds: float = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, with its running time added to :attr:`seconds`."""

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync_device(self.device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync_device(self.device)
                self.seconds += time.perf_counter() - start

        return timed

    def take(self) -> float:
        """The seconds accumulated since the last call, resetting the count."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def time_hooks(callback: L.Callback, hooks: Sequence[str], stopwatch: Stopwatch) -> None:
    """Make ``callback``'s ``hooks`` add their running time to ``stopwatch``.

    Lightning looks each hook up on the callback instance when it calls it, so an instance attribute wrapping the
    bound method is what runs.
    """
    for hook in hooks:
        setattr(callback, hook, stopwatch.wrap(getattr(callback, hook)))


@dataclass(frozen=True)
class EpochTiming:
    """One training epoch and the evaluation after it, in seconds.

    Attributes:
        epoch: Epoch index (0-based, warm-up epochs included).
        train_s: Training epoch: ``on_train_epoch_start`` to ``on_validation_start``.
        eval_s: Validation: ``on_validation_start`` to ``on_train_epoch_end``.
        robust_s: Part of ``eval_s`` inside :class:`RobustnessEvaluation`'s hooks.
        backdoor_s: Part of ``eval_s`` inside :class:`BackdoorEvaluation`'s hooks.
        train_batches: Training batches of the epoch.
        val_batches: Validation batches of the epoch.
    """

    epoch: int
    train_s: float
    eval_s: float
    robust_s: float
    backdoor_s: float
    train_batches: int
    val_batches: int

    @property
    def clean_s(self) -> float:
        """The rest of validation: the module's loss, greedy captions and BLEU, data loading, loop bookkeeping."""
        return self.eval_s - self.robust_s - self.backdoor_s

    def seconds(self, part: str) -> float:
        """Seconds of one of :data:`PARTS`."""
        return {"clean": self.clean_s, "robust": self.robust_s, "backdoor": self.backdoor_s, "total": self.eval_s}[part]


class EpochTimer(L.Callback):
    """Times every training epoch and the validation after it; must be the first callback.

    Args:
        robust: Stopwatch of the robustness callback's hooks.
        backdoor: Stopwatch of the backdoor callback's hooks.
        device: Training device; CUDA is synchronised before each reading.
    """

    def __init__(self, robust: Stopwatch, backdoor: Stopwatch, device: torch.device) -> None:
        self.robust = robust
        self.backdoor = backdoor
        self.device = device
        self.epochs: list[EpochTiming] = []
        self._train_start = 0.0
        self._eval_start: float | None = None
        self._train_batches = 0
        self._val_batches = 0

    def _now(self) -> float:
        sync_device(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_batches = self._val_batches = 0
        self._eval_start = None
        self.robust.take()
        self.backdoor.take()
        self._train_start = self._now()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_batches += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = self._now()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._val_batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = self._now()
        if self._eval_start is None:
            raise RuntimeError(f"epoch {trainer.current_epoch} ran no validation: nothing to compare")
        self.epochs.append(
            EpochTiming(
                epoch=trainer.current_epoch,
                train_s=self._eval_start - self._train_start,
                eval_s=end - self._eval_start,
                robust_s=self.robust.take(),
                backdoor_s=self.backdoor.take(),
                train_batches=self._train_batches,
                val_batches=self._val_batches,
            )
        )


@dataclass(frozen=True)
class PartShare:
    """One part of the per-epoch evaluation as a share of the training epoch (medians over the timed epochs).

    Attributes:
        part: One of :data:`PARTS`.
        name: What the part is.
        seconds: Median seconds per epoch.
        share: Median over epochs of part / training epoch of the same epoch.
        share_range: Smallest and largest per-epoch share.
        share_at_default_epoch: ``share`` against a training epoch of :data:`DEFAULT_TRAIN_IMAGES` images (the
            measured epoch scaled by its number of batches).
        goal_met: For ``total`` only: whether ``share_at_default_epoch`` is within :data:`GOAL_SHARE`.
    """

    part: str
    name: str
    seconds: float
    share: float
    share_range: list[float]
    share_at_default_epoch: float
    goal_met: bool | None = None


@dataclass
class Setup:
    """The measured configuration (written to the report's ``config``)."""

    arch: str
    preset: str
    image_size: int
    batch_size: int
    train_images: int
    val_images: int
    poisoned_val_images: int
    trigger: str
    poison_rate: float
    warmup_epochs: int
    timed_epochs: int
    default_train_images: int = DEFAULT_TRAIN_IMAGES
    goal_share: float = GOAL_SHARE
    load_average_start: list[float] | None = None
    load_average_end: list[float] | None = None
    wall_s: float = 0.0
    epochs: list[dict[str, Any]] = field(default_factory=list)


def build_datamodule(args: argparse.Namespace, workdir: Path) -> CaptionDataModule:
    """The poisoned shapes data: generated into ``workdir`` unless ``--shapes-root`` names an existing dataset.

    Raises:
        DataError: ``--shapes-root`` holds something other than a shapes dataset of default settings at
            ``--image-size`` (the message names the differing settings).
    """
    poison = PoisonConfig(trigger=TRIGGER, cache_dir=str(workdir / "poison"))
    if args.shapes_root is not None:
        root, shapes, limit_train = args.shapes_root, None, args.n_train
    else:
        # No test split: the benchmark never tests, and poisoning it would only add set-up time.
        root, shapes, limit_train = (
            workdir / "shapes",
            {"n_train": args.n_train, "n_val": args.n_val, "n_test": 0},
            None,
        )
    datamodule = CaptionDataModule(
        format="shapes",
        root=str(root),
        image_size=args.image_size,
        batch_size=args.batch_size,
        limit_train=limit_train,
        limit_val=args.n_val if args.shapes_root is not None else None,
        shapes=shapes,
        poison=asdict(poison),
        progress=False,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def run(args: argparse.Namespace, device: torch.device, workdir: Path) -> tuple[Setup, list[EpochTiming]]:
    """Train for ``--warmup + --repeats`` epochs with the evaluation callbacks, timing every epoch.

    Returns:
        The configuration and the timing of every epoch, warm-up epochs included.
    """
    datamodule = build_datamodule(args, workdir)
    L.seed_everything(SEED, workers=True, verbose=False)
    module = CaptioningModule.with_tokenizer(
        datamodule.tokenizer,
        captioner={"class_path": ARCH, "init_args": {"preset": PRESET}},
        image_size=args.image_size,
        lr=LR,
        warmup_steps=WARMUP_STEPS,
    )
    robust_clock, backdoor_clock = Stopwatch(device), Stopwatch(device)
    robustness, backdoor = RobustnessEvaluation(), BackdoorEvaluation()
    time_hooks(robustness, EVAL_HOOKS, robust_clock)
    time_hooks(backdoor, EVAL_HOOKS, backdoor_clock)
    timer = EpochTimer(robust_clock, backdoor_clock, device)
    epochs = args.warmup + args.repeats
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, robustness, backdoor],
        default_root_dir=str(workdir / "run"),
    )
    load_start = load_average()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall_s = time.perf_counter() - start
    if len(timer.epochs) != epochs:
        raise RuntimeError(f"timed {len(timer.epochs)} epochs, not {epochs}")
    n_val = len(datamodule.records["val"])
    setup = Setup(
        arch=ARCH,
        preset=PRESET,
        image_size=args.image_size,
        batch_size=args.batch_size,
        train_images=len(datamodule.records["train"]),
        val_images=n_val,
        poisoned_val_images=sum(1 for record in datamodule.records["val"] if record.poisoned),
        trigger=TRIGGER,
        poison_rate=datamodule.poison.rate,
        warmup_epochs=args.warmup,
        timed_epochs=args.repeats,
        load_average_start=load_start,
        load_average_end=load_average(),
        wall_s=wall_s,
        epochs=[{**asdict(e), "clean_s": e.clean_s} for e in timer.epochs],
    )
    return setup, timer.epochs


def summarise(timings: Sequence[EpochTiming], setup: Setup) -> list[PartShare]:
    """The share of every part, over the timed (post-warm-up) epochs."""
    # An epoch goes over every (image, caption) pair, so its length is proportional to the number of images.
    scale = setup.default_train_images / setup.train_images
    rows = []
    for part in PARTS:
        shares = [t.seconds(part) / t.train_s for t in timings]
        at_default = [share / scale for share in shares]
        share_at_default = statistics.median(at_default)
        rows.append(
            PartShare(
                part=part,
                name=PART_NAMES[part],
                seconds=statistics.median(t.seconds(part) for t in timings),
                share=statistics.median(shares),
                share_range=[min(shares), max(shares)],
                share_at_default_epoch=share_at_default,
                goal_met=share_at_default <= GOAL_SHARE if part == "total" else None,
            )
        )
    return rows


def format_table(
    machine: dict[str, Any], setup: Setup, timings: Sequence[EpochTiming], rows: Sequence[PartShare]
) -> str:
    """A plain-text table of the shares, headed by the machine and the setup, followed by a legend."""
    head = (
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, lightning {machine['lightning']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
    )
    train_s = statistics.median(t.train_s for t in timings)
    config = (
        f"{setup.arch} {setup.preset}, {setup.image_size} px, batch {setup.batch_size}; training epoch: "
        f"{setup.train_images} images, median {train_s:.1f} s; evaluation: {setup.val_images} validation images "
        f"({setup.poisoned_val_images} with the {setup.trigger} trigger); {setup.warmup_epochs} warm-up + "
        f"{setup.timed_epochs} timed epochs"
    )
    default = f"share of {setup.default_train_images}-img epoch"
    columns = f"{'part':<40} {'s/epoch':>8} {'share':>7} {'range':>13} {default:>28}"
    lines = [head, config, columns, "-" * len(columns)]
    for row in rows:
        low, high = row.share_range
        verdict = (
            "" if row.goal_met is None else f"  goal <= {GOAL_SHARE:.0%}: " + ("met" if row.goal_met else "NOT met")
        )
        lines.append(
            f"{row.name:<40} {row.seconds:>8.2f} {row.share:>7.1%} {f'{low:.1%}-{high:.1%}':>13} "
            f"{row.share_at_default_epoch:>28.1%}{verdict}"
        )
    lines += [
        "share: median over timed epochs of (part / training epoch of the same epoch); range: min-max per epoch;",
        f"share of {setup.default_train_images}-img epoch: the same against a training epoch of the default "
        "shapes data (the measured epoch scaled by its number of images)",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n-train",
        type=int,
        default=DEFAULT_TRAIN_IMAGES,
        help=f"training images per epoch (default: {DEFAULT_TRAIN_IMAGES}, the default shapes data)",
    )
    parser.add_argument(
        "--n-val",
        type=int,
        default=DEFAULT_VAL_IMAGES,
        help=f"validation images evaluated per epoch (default: {DEFAULT_VAL_IMAGES}, the default shapes data's "
        "whole validation split, which the callbacks evaluate by default)",
    )
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first epochs (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs, one pair each (default: 3)")
    parser.add_argument(
        "--shapes-root",
        type=Path,
        help="an existing shapes dataset of default settings (e.g. data/shapes) to use instead of generating one "
        "into a temporary directory",
    )
    add_device_option(parser)
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("n_train", "n_val", "batch_size", "repeats", "threads"), 1)
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
    with tempfile.TemporaryDirectory(prefix="robucap-eval-bench-") as workdir:
        setup, timings = run(args, device, Path(workdir))
    timed = timings[args.warmup :]
    for t in timings:
        kind = "warm-up" if t.epoch < args.warmup else "timed"
        print(
            f"epoch {t.epoch} ({kind}): train {t.train_s:.1f} s ({t.train_batches} batches), evaluation "
            f"{t.eval_s:.1f} s = clean {t.clean_s:.1f} + robust {t.robust_s:.1f} + backdoor {t.backdoor_s:.2f} "
            f"({t.val_batches} batches): {t.eval_s / t.train_s:.1%} of the epoch",
            flush=True,
        )
    rows = summarise(timed, setup)
    print()
    print(format_table(machine, setup, timed, rows))
    return write_report("eval_overhead", argv, machine, [asdict(row) for row in rows], args.out, asdict(setup))


if __name__ == "__main__":
    main()
