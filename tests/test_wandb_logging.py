"""A CLI run with the default loggers writes an offline W&B run whose metrics, config and sample table read back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lightning_app.cli import main
from lightning_app.loggers import RobucapWandbLogger, wandb_offline_default
from lightning_app.wandb_offline import find_offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]


def test_offline_without_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline_default() is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline_default() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_default() is True


def test_default_loggers_write_a_readable_offline_run(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default loggers write under ./runs
    code = main(
        [
            "fit",
            "--data.format", "coco",
            "--data.root", str(shapes_root),
            "--data.image_size", "32",
            "--data.batch_size", "32",
            "--data.progress", "false",
            "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "2",
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    assert code == 0
    runs = find_offline_runs(tmp_path / "runs" / "wandb")
    assert len(runs) == 1
    # wandb-core writes the transaction log from its own process: give a loaded machine time to flush it.
    deadline = time.monotonic() + 60
    while True:
        run = read_offline_run(runs[0])
        val_rows = [row for row in run["history"] if "val/bleu4" in row]
        if len(val_rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [row["epoch"] for row in val_rows] == [0, 1]
    assert all(0.0 <= row["val/bleu4"] <= 1.0 for row in val_rows)
    assert any("train/loss" in row for row in run["history"])
    # The resolved config (LightningCLI) and the hyperparameters are in the run's config.
    assert run["config"]["config"]["data"]["root"] == str(shapes_root)
    assert run["config"]["captioner"]["init_args"]["preset"] == "tiny"
    # Each validation epoch logged a table of sample images with captions.
    assert run["summary"]["val/samples/_type"] == "table-file"
    assert (tmp_path / "runs" / "csv" / "version_0" / "metrics.csv").is_file()
    # A log read while wandb-core is still appending (cut anywhere, or with an unflushed chunk) gives a prefix of
    # the history, never a protobuf error: the CI once read a half-written record.
    data = runs[0].read_bytes()
    for cut in (len(data) - 1, len(data) * 2 // 3, len(data) // 2 + 3, 40):
        partial = tmp_path / f"cut{cut}.wandb"
        partial.write_bytes(data[:cut])
        prefix = read_offline_run(partial)["history"]
        assert prefix == run["history"][: len(prefix)]
    garbled = bytearray(data)
    garbled[len(data) // 2] ^= 0xFF
    (tmp_path / "garbled.wandb").write_bytes(bytes(garbled))
    prefix = read_offline_run(tmp_path / "garbled.wandb")["history"]
    assert len(prefix) < len(run["history"]) and prefix == run["history"][: len(prefix)]


def test_logger_class_is_wandb_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = RobucapWandbLogger(save_dir=str(tmp_path))
    assert isinstance(logger, WandbLogger)
