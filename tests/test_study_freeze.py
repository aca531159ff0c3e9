"""`robucap study freeze` end to end on the smoke profile: the five rows with every documented key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_app.cli import main
from lightning_app.studies.freeze import PHASES, FreezeStudyConfig

BLEU = {"bleu1", "bleu2", "bleu3", "bleu4"}


def test_study_freeze_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "freeze", "--out", str(out), "--profile", "smoke", "--data-root", str(tmp_path / "shapes"),
            "--image-size", "32", "--no-wandb"]  # fmt: skip
    assert main(args) == 0
    assert str(out / "report.html") in capsys.readouterr().out.strip().splitlines()[-1]
    block = json.loads((out / "results.json").read_text())["freeze_study"]
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
