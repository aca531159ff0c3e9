"""One run, two checks: a DDP fit with AdversarialTraining + FreezeEncoder, and RobustnessEvaluation under DDP.

Run as a script (Lightning's DDP launcher re-executes ``sys.argv`` for rank 1, so it must be a real file)::

    python tests/helpers/adversarial_ddp.py --shapes-root R --checkpoint C --out O --devices 2

and it writes, under ``O``:

* ``fit/initial_rank{r}.pt`` and ``fit/final_rank{r}.pt``: each rank's captioner ``state_dict`` at fit start (after
  DDP's broadcast) and at fit end. The fit starts from a fresh module built by the Trainer (``configure_model``), so
  the freeze takes the deferred path that must still precede the DDP wrapper;
* ``validate.json`` (rank 0): the ``val/*`` metrics of ``trainer.validate`` on checkpoint ``C`` with
  :class:`~callbacks.robustness.RobustnessEvaluation` and :class:`~callbacks.adversarial_examples.AdversarialExamples`.

:func:`robustness_scores` is the same validation for the in-process, single-process comparison.
"""

from __future__ import annotations

import os

# Before transformers is imported (the script does not go through conftest.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks import AdversarialExamples, AdversarialTraining, FreezeEncoder, RobustnessEvaluation  # noqa: E402
from datamodules.datamodule import CaptionDataModule  # noqa: E402
from modules.captioning import CaptioningModule  # noqa: E402

SCRIPT = Path(__file__).resolve()
# Large enough to change captions of the tiny test model (0.05 barely does), small enough to keep some BLEU.
EPSILONS = [0.05, 0.2]
EVAL_BATCH_SIZE = 4


class SaveCaptionerWeights(L.Callback):
    """Write ``initial_rank{r}.pt`` at fit start and ``final_rank{r}.pt`` at fit end (the captioner's weights)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.captioner.state_dict().items()}
        torch.save(state, self.out / f"{stage}_rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "initial")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "final")


def datamodule(shapes_root: Path) -> CaptionDataModule:
    return CaptionDataModule(
        format="coco",
        root=str(shapes_root),
        image_size=32,
        batch_size=8,
        eval_batch_size=EVAL_BATCH_SIZE,
        progress=False,
    )


def _trainer(devices: int, **kwargs: Any) -> L.Trainer:
    ddp = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **ddp,
        **kwargs,
    )


def fit(shapes_root: Path, out: Path, devices: int) -> None:
    """Two optimizer steps of mixed FGSM training with the encoder frozen."""
    L.seed_everything(0)
    module = CaptioningModule(image_size=32, warmup_steps=0, lr=1e-3)
    callbacks = [FreezeEncoder(), AdversarialTraining(mode="mixed", epsilon=0.05), SaveCaptionerWeights(out / "fit")]
    trainer = _trainer(devices, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule(shapes_root))


def robustness_scores(shapes_root: Path, checkpoint: Path, out: Path, devices: int = 1) -> dict[str, float]:
    """``trainer.validate`` on ``checkpoint`` with RobustnessEvaluation (FGSM at :data:`EPSILONS`)."""
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    callbacks = [RobustnessEvaluation(attacks=["fgsm"], epsilons=EPSILONS), AdversarialExamples(num_images=2)]
    trainer = _trainer(devices, callbacks=callbacks, default_root_dir=str(out))
    trainer.validate(module, datamodule=datamodule(shapes_root), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def run_script(shapes_root: Path, checkpoint: Path, out: Path, devices: int = 2, timeout: float = 400) -> None:
    """Run this file in a subprocess (which launches the other rank itself) and fail with its stderr."""
    args = [sys.executable, str(SCRIPT), "--shapes-root", str(shapes_root), "--checkpoint", str(checkpoint),
            "--out", str(out), "--devices", str(devices)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")


_RUNS: dict[tuple[str, str], Path] = {}


def ddp_run_once(shapes_root: Path, checkpoint: Path, make_dir: Callable[[], Path]) -> Path:
    """The output directory of one 2-process run, shared by every test module of the session (it is the slow part).

    Args:
        shapes_root: Dataset root.
        checkpoint: Trained checkpoint for the validation half.
        make_dir: Creates a fresh directory (e.g. ``lambda: tmp_path_factory.mktemp("adv_ddp")``), called once.
    """
    key = (str(shapes_root), str(checkpoint))
    if key not in _RUNS:
        out = make_dir() / "run"
        run_script(shapes_root, checkpoint, out, devices=2)
        _RUNS[key] = out
    return _RUNS[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes-root", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    fit(args.shapes_root, args.out, args.devices)
    # A second Trainer in the same processes: the launcher set LOCAL_RANK, so it reuses the process group.
    scores = robustness_scores(args.shapes_root, args.checkpoint, args.out / "validate", args.devices)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        (args.out / "validate.json").write_text(json.dumps(scores, indent=2, sort_keys=True), encoding="utf-8")


if __name__ == "__main__":
    main()
