"""`robucap study freeze` end to end on the smoke profile: the five rows with every documented key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.studies.base import StudyData
from lightning_app.studies.freeze import PHASES, FreezeStudy, FreezeStudyConfig

BLEU = {"bleu1", "bleu2", "bleu3", "bleu4"}


def test_study_freeze_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "freeze", "--out", str(out), "--profile", "smoke", "--data.root", str(tmp_path / "shapes"),
            "--data.image_size", "32", "--study.wandb", "false"]  # fmt: skip
    assert main(args) == 0
    assert str(out / "report.html") in capsys.readouterr().out.strip().splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["freeze"]["status"] == "ok" and list(results["stages"]) == ["freeze"]
    assert results["settings"]["study"]["trials"] == 2 and results["freeze_study"]["config"]["trials"] == 2
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


def _failing_run(error: Exception):  # noqa: ANN202 - a replacement for FreezeStudy.run
    def run(self: FreezeStudy, settings: FreezeStudyConfig, data: StudyData, out: Path) -> None:
        (out / "partial.txt").write_text("written before the failure")
        raise error

    return run


def test_a_failing_study_writes_its_stage_and_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FreezeStudy, "run", _failing_run(RobucapError("the data has no test split")))
    out = tmp_path / "study"
    assert main(["study", "freeze", "--out", str(out), "--data.root", str(tmp_path / "shapes")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "robucap: error: study stage 'freeze' failed: the data has no test split"
    )
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["freeze"]["status"] == "failed"
    assert results["stages"]["freeze"]["error"] == "RobucapError: the data has no test split"
    assert (out / "partial.txt").is_file() and (out / "report.html").is_file()
    assert results["settings"]["study"]["epsilon"] == 0.05


def test_a_bug_in_a_study_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FreezeStudy, "run", _failing_run(KeyError("rows")))
    out = tmp_path / "study"
    with pytest.raises(KeyError, match="rows"):
        main(["study", "freeze", "--out", str(out), "--data.root", str(tmp_path / "shapes")])
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
