"""`robucap study freeze` end to end on the smoke profile: the five rows with every documented key."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datamodules.errors import RobucapError
from lightning_app import studies
from lightning_app.cli import main
from lightning_app.report import Report
from lightning_app.studies.freeze import PHASES, FreezeStudyConfig

BLEU = {"bleu1", "bleu2", "bleu3", "bleu4"}


def test_study_freeze_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "freeze", "--out", str(out), "--profile", "smoke", "--data-root", str(tmp_path / "shapes"),
            "--image-size", "32", "--no-wandb"]  # fmt: skip
    assert main(args) == 0
    assert str(out / "report.html") in capsys.readouterr().out.strip().splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["freeze"]["status"] == "ok" and list(results["stages"]) == ["freeze"]
    block = results["freeze_study"]
    assert block["epsilon"] == 0.05
    rows = {r["name"]: r for r in block["rows"]}
    assert list(rows) == list(PHASES)
    for row in rows.values():
        for split in ("train", "test"):
            for kind in ("clean", "adversarial"):
                assert set(row[split][kind]) == BLEU
                assert set(row["std"][split][kind]) == BLEU
        assert row["trainable_params"] > 0 and row["train_seconds"] > 0
        assert row["test"]["n_images"] == 8 and row["train"]["n_images"] == 8
    assert rows["freeze_encoder"]["trials"] == 2 and rows["baseline"]["trials"] == 1
    assert rows["freeze_encoder"]["trainable_params"] < rows["adversarial_training"]["trainable_params"]
    assert rows["freeze_decoder"]["trainable_params"] < rows["adversarial_training"]["trainable_params"]
    html = (out / "report.html").read_text()
    assert "Freeze study" in html and html.count("data:image/png;base64,") >= 2  # bar chart + examples


def _failing_study(error: Exception) -> Callable[..., tuple[dict, str]]:
    def study(args: argparse.Namespace, out: Path, shapes: dict[str, Any], report: Report) -> tuple[dict, str]:
        report.heading("written before the failure")
        raise error

    return study


def test_a_failing_study_writes_its_stage_and_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(studies, "_freeze", _failing_study(RobucapError("the data has no test split")))
    out = tmp_path / "study"
    assert main(["study", "freeze", "--out", str(out), "--data-root", str(tmp_path / "shapes")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "robucap: error: study stage 'freeze' failed: the data has no test split"
    )
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["freeze"]["status"] == "failed"
    assert results["stages"]["freeze"]["error"] == "RobucapError: the data has no test split"
    assert "written before the failure" in (out / "report.html").read_text()


def test_a_bug_in_a_study_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studies, "_freeze", _failing_study(KeyError("rows")))
    out = tmp_path / "study"
    with pytest.raises(KeyError, match="rows"):
        main(["study", "freeze", "--out", str(out), "--data-root", str(tmp_path / "shapes")])
    record = json.loads((out / "results.json").read_text())["stages"]["freeze"]
    assert record["status"] == "failed" and record["error"] == "KeyError: 'rows'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 1.5}, "epsilon must be in \\[0, 1\\]"),
        ({"epsilon": -0.1}, "epsilon must be in \\[0, 1\\]"),
        ({"trials": 0}, "trials must be >= 1"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    from datamodules.errors import RobucapError

    with pytest.raises(RobucapError, match=message):
        FreezeStudyConfig(**kwargs)
