"""`robucap demo` end to end on the smoke profile: results.json keys and a report that embeds its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_app.cli import main


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out, data = tmp_path / "demo", tmp_path / "shapes"
    assert main(["demo", "--out", str(out), "--data", str(data), "--profile", "smoke"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("robucap demo done") and str(out / "report.html") in summary

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["name"] == "shapes"
    assert results["dataset"]["splits"] == {"train": 48, "val": 9, "test": 9}
    assert results["dataset"]["image_size"] == 32
    baseline = results["baseline"]
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert 0.0 <= baseline["test"][key] <= 10.0
    assert Path(baseline["checkpoint"]).is_file()
    assert baseline["train_seconds"] > 0

    report = (out / "report.html").read_text()
    assert "Baseline" in report and report.count("data:image/png;base64,") >= 2  # curves + test grid
    assert (data / "meta.json").is_file()  # the data was created because it was missing
