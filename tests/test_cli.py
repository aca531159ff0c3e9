"""The `robucap` command: every subcommand once on tiny settings, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_app.cli import main

REPO = Path(__file__).resolve().parents[1]


def _tiny_args(shapes_root: Path, out: Path, csv: bool = True) -> list[str]:
    logger = ["--config", str(REPO / "configs/logger/csv.yaml"), "--trainer.logger.init_args.save_dir", str(out)]
    return [
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        *(logger if csv else []),
        "--data.format", "coco",
        "--data.root", str(shapes_root),
        "--data.image_size", "32",
        "--data.batch_size", "32",
        "--data.progress", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "fit|validate|test|predict" in capsys.readouterr().out


def test_python_dash_m_is_the_same_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_app", "nonsense"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "robucap: error: unknown command 'nonsense'; expected one of " + (
        "fit, validate, test, predict, data, export, demo, study, poison-scan, attack"
    )


def test_data_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--n-train", "6", "--n-val", "2", "--n-test", "2",
                 "--image-size", "32"]) == 0  # fmt: skip
    assert "train 6, val 2, test 2" in capsys.readouterr().out
    captions = json.loads((out / "annotations/captions_train.json").read_text())
    assert len(captions["images"]) == 6
    assert len(list((out / "images/val").glob("*.png"))) == 2


def test_data_shapes_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--max-objects", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error:") and "max_objects" in err and len(err.splitlines()) == 1


def test_fit_validate_test_export(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(shapes_root, tmp_path / "runs")
    assert main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"]) == 0
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    names = {p.name for p in checkpoints}
    assert {"best.ckpt", "last.ckpt"} <= names
    ckpt = next(p for p in checkpoints if p.name == "best.ckpt")
    # LightningCLI's SaveConfigCallback (LoggedConfigCallback's parent) writes the resolved config to trainer.log_dir,
    # the CSV logger's version folder, next to metrics.csv.
    configs = sorted((tmp_path / "runs").rglob("config.yaml"))
    assert len(configs) == 1 and (configs[0].parent / "metrics.csv").is_file()
    saved = yaml.safe_load(configs[0].read_text())
    assert saved["data"]["root"] == str(shapes_root) and saved["data"]["image_size"] == 32
    assert saved["model"]["captioner"]["init_args"]["preset"] == "tiny" and saved["trainer"]["max_epochs"] == 1

    assert main(["validate", *args, "--ckpt_path", str(ckpt)]) == 0
    assert main(["test", *args, "--ckpt_path", str(ckpt)]) == 0
    metrics = sorted((tmp_path / "runs").rglob("metrics.csv"))
    text = "\n".join(p.read_text() for p in metrics)
    for key in ("val/bleu4", "test/bleu4", "test/cider", "test/rouge_l"):
        assert key in text

    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export/model.safetensors").is_file()


def test_fit_without_logger(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(shapes_root, tmp_path / "runs", csv=False)
    assert main(["fit", *args, "--trainer.logger", "false", "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]) == 0  # fmt: skip
    assert not (tmp_path / "runs" / "wandb").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.format", "parquet"], "unknown dataset format 'parquet'"),
        (["--data.tokenizer", "/nonexistent/tok"], "tokenizer directory /nonexistent/tok does not exist"),
        (["--model.captioner.init_args.preset", "pretrained", "--model.captioner.init_args.pretrained_dir",
          "/nonexistent/vit"],
         "pretrained directory /nonexistent/vit does not exist"),
        (["--model.captioner.init_args.preset", "huge"], "unknown model preset 'huge'"),
    ],
)  # fmt: skip
def test_fit_bad_input_one_line(
    shapes_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["fit", *_tiny_args(shapes_root, tmp_path / "runs"), "--trainer.max_epochs", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("robucap: error:") and message in err[-1]


def test_export_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert f"checkpoint {tmp_path / 'nope.ckpt'} does not exist" in capsys.readouterr().err


def test_export_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "was not written by robucap" in capsys.readouterr().err


def test_console_script_installed() -> None:
    script = Path(sys.executable).parent / "robucap"
    assert script.is_file() and os.access(script, os.X_OK)
