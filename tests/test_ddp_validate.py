"""DDP-exact validation: `robucap validate` in 2 CPU processes (gloo) gives exactly the single-process BLEU.

The validation split has 21 images (odd), so DistributedSampler pads one duplicate that must not count twice.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _validate(ckpt: Path, shapes_root: Path, out: Path, ddp: bool) -> dict[str, float]:
    args = [
        sys.executable, "-m", "lightning_app", "validate",
        "--config", str(REPO / "configs/logger/csv.yaml"),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--data.format", "coco",
        "--data.root", str(shapes_root),
        "--data.image_size", "32",
        "--data.eval_batch_size", "4",
        "--data.progress", "false",
        "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    if ddp:
        args[4:4] = ["--config", str(REPO / "configs/trainer/ddp_cpu2.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = list(out.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/bleu") and v}


def test_two_process_validate_equals_single_process(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path
) -> None:
    single = _validate(trained_checkpoint, shapes_root, tmp_path / "single", ddp=False)
    double = _validate(trained_checkpoint, shapes_root, tmp_path / "ddp", ddp=True)
    assert set(single) == {"val/bleu1", "val/bleu2", "val/bleu3", "val/bleu4"}
    assert single["val/bleu1"] > 0.2  # a trained model, so the comparison is not between zeros
    assert double == single
