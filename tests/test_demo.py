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

    # Issue 5's blocks: every Show-and-Fool mode is reported (run, or why not), and the transfer study's matrices.
    assert set(results["show_and_fool"]) == {"caption", "keyword_1", "keyword_2", "keyword_3", "settings"}
    for mode in ("caption", "keyword_1", "keyword_2", "keyword_3"):
        block = results["show_and_fool"][mode]
        assert {"success_rate", "mean_l2", "n"} <= set(block)
        assert block["n"] > 0 or block["not_run"]
    models = [m["name"] for m in results["transfer"]["models"]]
    assert len(models) == 3
    for kind in ("targeted", "non_targeted"):
        assert set(results["transfer"]["matrix"][kind]) == set(models)
    assert {r["held_out"] for r in results["ensemble"]["rows"]} == set(models)

    report = (out / "report.html").read_text()
    assert "Show-and-Fool" in report
    assert "Baseline" in report and report.count("data:image/png;base64,") >= 2  # curves + test grid
    assert (data / "meta.json").is_file()  # the data was created because it was missing
