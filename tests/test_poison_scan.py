"""Spectral-signature poison scan: the score and ranking maths, and `robucap fit` + `robucap poison-scan` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from datamodules.errors import RobucapError
from lightning_app.cli import main
from modules.defenses import ranking_quality, spectral_signature_scores

REPO = Path(__file__).resolve().parents[1]


def test_poisoned_cluster_has_the_highest_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(300, 16, generator=generator)
    poisoned = torch.randn(60, 16, generator=generator) + 8.0 * torch.nn.functional.one_hot(torch.tensor(3), 16)
    scores = spectral_signature_scores(torch.cat([clean, poisoned]))
    truth = torch.cat([torch.zeros(300, dtype=torch.bool), torch.ones(60, dtype=torch.bool)])
    quality = ranking_quality(scores, truth, k=90)
    assert quality["recall"] == 1.0 and quality["precision"] == pytest.approx(60 / 90)
    assert quality["auroc"] > 0.99


def test_ranking_quality_by_hand() -> None:
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.3, 0.05])
    truth = torch.tensor([True, False, False, True, False, False])
    quality = ranking_quality(scores, truth, k=2)
    assert (quality["precision"], quality["recall"], quality["n"], quality["n_poisoned"]) == (0.5, 0.5, 6, 2)
    # Pairs (poisoned > clean): 0.9 beats all 4; 0.3 beats 0.1 and 0.05, ties 0.3 (half): 6.5 / 8.
    assert quality["auroc"] == pytest.approx(6.5 / 8)
    with pytest.raises(RobucapError, match=r"need a \(N >= 2, D\) feature matrix"):
        spectral_signature_scores(torch.zeros(1, 4))


def test_fit_then_scan(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs/experiment/shapes_backdoor.yaml"
    data = ["--data.root", str(shapes_root), "--data.format", "coco", "--data.image_size", "32",
            "--data.poison.cache_dir", str(tmp_path / "cache"), "--data.progress", "false"]  # fmt: skip
    fit = ["fit", "--config", str(config), "--config", str(REPO / "configs/logger/csv.yaml"), *data,
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir",
           str(tmp_path / "runs"), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(fit) == 0
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text()
    assert all(key in metrics for key in ("val/asr", "val/asr_relaxed", "val/ftr", "val/clean_bleu4"))
    ckpt = next(p for p in (tmp_path / "runs").rglob("best.ckpt"))

    scan_config = tmp_path / "scan.yaml"
    scan_config.write_text(
        "data:\n  format: coco\n  image_size: 32\n  progress: false\n"
        f"  poison: {{trigger: object_noise, rate: 0.3, cache_dir: {tmp_path / 'cache'}}}\n"
    )
    out = tmp_path / "scan"
    args = ["poison-scan", "--ckpt", str(ckpt), "--config", str(scan_config), "--data-root", str(shapes_root)]
    assert main([*args, "--out", str(out)]) == 0
    block = json.loads((out / "results.json").read_text())["poison_scan"]
    assert (block["n"], block["n_poisoned"], block["k"]) == (160, 48, 72)  # k = round(0.45 * 160)
    assert 0.0 <= block["precision"] <= 1.0 and 0.0 <= block["auroc"] <= 1.0
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_scan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["poison-scan", "--ckpt", str(tmp_path / "no.ckpt"), "--config", "x.yaml", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == f"robucap: error: checkpoint {tmp_path / 'no.ckpt'} does not exist"


def test_ranking_auroc_equals_an_independent_computation() -> None:
    """The ROC AUC is torchmetrics' (ties count half), checked against sklearn-free pair counting on random data."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 20, (200,), generator=generator).float()  # many ties on purpose
    truth = torch.rand(200, generator=generator) < 0.3
    pos, neg = scores[truth], scores[~truth]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    expected = float(wins) / (len(pos) * len(neg))
    # torchmetrics integrates the ROC curve in float32: agreement to 1e-6, not to the last bit.
    assert ranking_quality(scores, truth, k=10)["auroc"] == pytest.approx(expected, abs=1e-6)
    assert math.isnan(ranking_quality(scores, torch.zeros(200, dtype=torch.bool), k=10)["auroc"])
