"""Config-driven `robucap study` and `robucap demo`: shipped profiles, --print_config round trips, overrides, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from datamodules.errors import RobucapError
from lightning_app import demo
from lightning_app.cli import main
from lightning_app.studies import STUDY_CONFIGS, available_studies
from lightning_app.studies.base import Study, StudyData

STUDIES = ("freeze", "backdoor", "transfer", "dense")


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``robucap ... --print_config`` prints (it exits 0, as ``robucap fit --print_config`` does)."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--print_config"])
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def _stopped_run(self: Study, settings: object, data: StudyData, out: Path) -> None:
    raise RobucapError("stopped before training")


def test_every_study_has_its_three_shipped_profiles() -> None:
    assert set(available_studies()) == set(STUDIES)
    for name in STUDIES:
        assert {p.name for p in STUDY_CONFIGS.glob(f"{name}_*.yaml")} == {f"{name}_{p}.yaml" for p in
                                                                             ("full", "quick", "smoke")}  # fmt: skip


@pytest.mark.parametrize("name", STUDIES)
def test_print_config_passed_back_reproduces_the_settings_block(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = available_studies()[name]
    monkeypatch.setattr(type(study), "run", _stopped_run)
    out = tmp_path / "study"
    printed = _printed(["study", name, "--out", str(out), "--profile", "smoke", "--data.image_size", "32"], capsys)
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert main(["study", name, "--config", str(config)]) == 2  # the stopped run: results.json is written anyway
    assert capsys.readouterr().err.strip().endswith(f"study stage '{name}' failed: stopped before training")
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == yaml.safe_load(printed)
    assert results["settings"]["data"]["image_size"] == 32 and results["settings"]["data"]["shapes"]["n_train"] == 48
    assert results["stages"][name]["status"] == "failed"


def test_a_flag_overrides_the_profile_wherever_it_stands(capsys: pytest.CaptureFixture[str]) -> None:
    before = yaml.safe_load(_printed(["study", "freeze", "--study.epsilon", "0.1", "--profile", "smoke", "--out",
                                      "o"], capsys))  # fmt: skip
    assert before["study"]["epsilon"] == 0.1 and before["study"]["trials"] == 2  # the smoke profile's
    transfer = yaml.safe_load(_printed(["study", "transfer", "--out", "o", "--study.images", "7"], capsys))
    assert transfer["study"]["images"] == 7 and transfer["study"]["sf_iterations"] == 200  # the defaults: full


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # An option of another study is not silently ignored.
        (["study", "backdoor", "--out", "o", "--study.images", "5"], "study backdoor: unrecognized arguments"),
        (["study", "transfer", "--out", "o", "--study.epsilon", "0.1"], "study transfer: unrecognized arguments"),
        (["study", "freeze", "--out", "o", "--epsilon", "0.1"], "study freeze: unrecognized arguments: --epsilon"),
        (["study", "freeze", "--out", "o", "--study.trials", "many"], "study freeze: .*study.trials"),
        (["study", "freeze", "--out", "o", "--study.trials", "0"], "freeze study trials must be >= 1, got 0"),
        (["study", "freeze", "--out", "o", "--profile", "fast"], "unknown --profile 'fast'; expected one of"),
        (["study", "freeze"], "study freeze: .*out"),
        (["study", "lstm", "--out", "o"], "unknown study 'lstm'; expected one of"),
        (["study", "backdoor", "--out", "o", "--data.format", "coco"], "--data.format coco needs --data.root"),
        (["demo", "--freeze.seed", "3"], "demo: unrecognized arguments: --freeze.seed 3"),
        (["demo", "--show_and_fool.targets", "mine"], "show_and_fool.targets must be 'paper' or 'references'"),
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robucap: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_demo_print_config_passed_back_reproduces_the_settings_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "STAGES", [])  # the settings block only: no stage runs
    out = tmp_path / "demo"
    printed = _printed(["demo", "--profile", "smoke", "--out", str(out), "--baseline.epochs", "2"], capsys)
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert main(["demo", "--config", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == yaml.safe_load(printed) and results["profile"] == "smoke"
    assert results["settings"]["baseline"]["epochs"] == 2 and results["settings"]["freeze"]["trials"] == 1
    assert "seed" not in results["settings"]["freeze"]  # the demo's --seed drives it: no option left unread


def test_demo_defaults_to_the_quick_profile(capsys: pytest.CaptureFixture[str]) -> None:
    settings = yaml.safe_load(_printed(["demo"], capsys))
    assert settings["name"] == "quick" and settings["show_and_fool"]["iterations"] == 300
    assert settings["freeze"]["trials"] == 1 and settings["transfer"]["images"] == 16
