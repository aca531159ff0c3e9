"""One tiny ``robucap fit`` run for the resume tests, optionally killed with SIGKILL in the middle of an epoch.

Run as a script, so that a kill takes down a whole process, as ``kill -9`` would::

    python tests/helpers/resume_run.py --shapes-root R --out O [--adversarial] [--kill-at-step K] [--ckpt-path P]

It runs ``robucap fit`` (the real CLI with ``configs/defaults.yaml``: :class:`~callbacks.training_rng.TrainingRNG`,
``best.ckpt`` and :class:`~callbacks.latest_checkpoint.LatestCheckpoint`) on :data:`SETTINGS`: 16 shapes images x 5
captions at 32 px, batch 8, so 10 optimizer steps per epoch, 3 epochs, validation every 2 epochs, and ``last.ckpt``
every :data:`EVERY_N_STEPS` steps besides every epoch end. Checkpoints go to ``O/checkpoints``.

``--kill-at-step K`` adds :class:`KillAtStep`: the process sends itself SIGKILL during optimizer step ``K`` (after its
forward and backward pass, before the update), so nothing is cleaned up or saved. ``--adversarial`` adds mixed
adversarial training with FGSM-RS, whose random start draws from the global generator inside every step, and loads
the data with one worker process (which fetches batches ahead of the training loop).
"""

from __future__ import annotations

import os

# Before transformers is imported (the script does not go through conftest.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import argparse  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[2]
STEPS_PER_EPOCH = 10
MAX_EPOCHS = 3
EVERY_N_STEPS = 4
SETTINGS = [
    "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
    "--data.format", "coco",
    "--data.image_size", "32",
    "--data.batch_size", "8",
    "--data.eval_batch_size", "4",
    "--data.limit_train", "16",  # x 5 captions = 80 pairs = 10 batches
    "--data.limit_val", "4",
    "--data.progress", "false",
    "--model.warmup_steps", "3",
    "--model.max_new_tokens", "8",
    "--trainer.logger", "false",
    "--trainer.max_epochs", str(MAX_EPOCHS),
    "--trainer.check_val_every_n_epoch", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    # Options of the callback listed last in configs/defaults.yaml, LatestCheckpoint.
    "--trainer.callbacks.every_n_train_steps", str(EVERY_N_STEPS),
]  # fmt: skip


class KillAtStep(L.Callback):
    """Send this process SIGKILL during optimizer step ``step`` (1-based), between backward and the update.

    Args:
        step: The optimizer step to die in.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fit_args(
    shapes_root: Path, out: Path, adversarial: bool, kill_at_step: int | None, ckpt_path: Path | None
) -> list[str]:
    """The ``robucap fit`` arguments of one run."""
    args = ["fit", *SETTINGS, "--data.root", str(shapes_root), "--trainer.default_root_dir", str(out)]
    if adversarial:
        args += ["--data.num_workers", "1", "--trainer.callbacks+=callbacks.AdversarialTraining",
                 "--trainer.callbacks.mode", "mixed", "--trainer.callbacks.attack", "fgsm_rs",
                 "--trainer.callbacks.epsilon", "0.05"]  # fmt: skip
    if kill_at_step is not None:
        args += ["--trainer.callbacks+=tests.helpers.resume_run.KillAtStep",
                 "--trainer.callbacks.step", str(kill_at_step)]  # fmt: skip
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    return args


def start_script(
    shapes_root: Path,
    out: Path,
    adversarial: bool = False,
    kill_at_step: int | None = None,
    ckpt_path: Path | None = None,
) -> subprocess.Popen[str]:
    """Start this file in a subprocess (one intra-op thread); read its result with ``communicate()``."""
    args = [sys.executable, str(SCRIPT), "--shapes-root", str(shapes_root), "--out", str(out)]
    if adversarial:
        args.append("--adversarial")
    if kill_at_step is not None:
        args += ["--kill-at-step", str(kill_at_step)]
    if ckpt_path is not None:
        args += ["--ckpt-path", str(ckpt_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adversarial", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--ckpt-path", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from lightning_app.cli import main as robucap

    return robucap(fit_args(args.shapes_root, args.out, args.adversarial, args.kill_at_step, args.ckpt_path))


if __name__ == "__main__":
    sys.exit(main())
