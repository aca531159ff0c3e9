"""`robucap study backdoor` end to end on the smoke profile: the three rows with every documented key, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.studies.backdoor import ROWS, BackdoorStudyConfig

BLEU = {"bleu1", "bleu2", "bleu3", "bleu4"}


def test_study_backdoor_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, cache = tmp_path / "study", tmp_path / "shapes", tmp_path / "cache"
    args = ["study", "backdoor", "--out", str(out), "--profile", "smoke", "--data.root", str(data),
            "--data.image_size", "32", "--study.wandb", "false", "--study.cache_dir", str(cache)]  # fmt: skip
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("robucap study backdoor done") and "object_noise ASR" in last
    assert str(out / "report.html") in last
    block = json.loads((out / "results.json").read_text())["backdoor_study"]
    assert block["poison_rate"] == 0.3 and block["target_caption"] == "you are under attack"
    assert block["alpha"] == pytest.approx(20 / 255)
    rows = {r["name"]: r for r in block["rows"]}
    assert list(rows) == list(ROWS)
    for row in rows.values():
        assert set(row["test_clean"]) == BLEU
        for key in ("asr", "asr_relaxed", "ftr"):
            assert 0.0 <= row[key] <= 1.0
        assert row["n_poisoned_test"] + row["n_skipped"] == 8 and row["n_clean_test"] == 8
    for name in ("badnets", "object_noise"):
        # BackdoorEvaluation logged the rates after the epoch.
        assert {"asr", "ftr", "clean_bleu4"} <= set(rows[name]["epochs"][0])
        manifests = block["dataset"][name]
        assert manifests["train"]["n_poisoned"] == round(0.3 * 48) and Path(manifests["test"]["manifest"]).is_file()
    assert rows["benign"]["asr_measured_on"] == "object_noise"
    html = (out / "report.html").read_text()
    assert "Backdoor study" in html and html.count("data:image/png;base64,") >= 2  # curves + examples
    assert not any(p.suffix == ".png" and "poison" in str(p) for p in data.rglob("*"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.2}, r"poison.rate must be a share of images in \[0, 1\]"),
        ({"target_caption": ""}, "poison.target_caption must contain at least one word"),
        ({"alpha": 0}, "poison.alpha must be > 0"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"arch": "lstm"}, "arch must be one of"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        BackdoorStudyConfig(**kwargs)


def test_bad_rate_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["study", "backdoor", "--out", str(tmp_path / "o"), "--profile", "smoke", "--study.rate", "-0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    # Checked when the settings are parsed, before anything is written.
    assert code == 2 and err[-1].startswith("robucap: error: poison.rate must be a share of images in [0, 1]")
    assert not (tmp_path / "o").exists()
