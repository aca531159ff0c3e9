"""`robucap demo` end to end on the smoke profile: results.json keys, stage outcomes and a report with its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from datamodules.tokenizer import build_word_tokenizer
from lightning_app import demo
from lightning_app.cli import main


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out, data = tmp_path / "demo", tmp_path / "shapes"
    assert main(["demo", "--out", str(out), "--data", str(data), "--profile", "smoke"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("robucap demo done") and str(out / "report.html") in summary

    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "smoke" and results["settings"]["show_and_fool"]["targets"] == "references"
    assert results["dataset"]["name"] == "shapes"
    assert results["dataset"]["splits"] == {"train": 48, "val": 9, "test": 9}
    assert results["dataset"]["image_size"] == 32
    baseline = results["baseline"]
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert 0.0 <= baseline["test"][key] <= 10.0
    assert Path(baseline["checkpoint"]).is_file()
    assert baseline["train_seconds"] > 0

    # Every registered stage ran (results.json sorts its keys).
    assert list(results["stages"]) == sorted(name for name, _ in demo.STAGES)
    for name, record in results["stages"].items():
        assert record["status"] == "ok", (name, record)
        assert record["seconds"] >= 0 and "error" not in record and "reason" not in record

    # Every Show-and-Fool mode attacked images (fixed targets from the references on the smoke profile).
    assert set(results["show_and_fool"]) == {"caption", "keyword_1", "keyword_2", "keyword_3", "settings"}
    assert results["show_and_fool"]["settings"]["targets"] == "references"
    for mode in ("caption", "keyword_1", "keyword_2", "keyword_3"):
        block = results["show_and_fool"][mode]
        assert block["n"] > 0 and 0.0 <= block["success_rate"] <= 1.0, (mode, block)
        assert "skipped" not in block and Path(block["report"]).is_file()
        assert len(block["target"].split(",")) == (1 if mode == "caption" else int(mode[-1]))
    models = [m["name"] for m in results["transfer"]["models"]]
    assert len(models) == 3
    for kind in ("targeted", "targeted_optimization", "non_targeted"):
        assert set(results["transfer"]["matrix"][kind]) == set(models)
    assert {r["held_out"] for r in results["ensemble"]["rows"]} == set(models)
    # Every targeted ensemble row: the share fooled on every member (white-box) and on the held-out model.
    targeted_rows = [r for r in results["ensemble"]["rows"] if r["targeted"]]
    assert len(targeted_rows) == 3 * 3  # three held-out models, three methods
    for row in targeted_rows:
        for share in (row["on_members"]["target_hit"], row["on_held_out"]["target_hit"]):
            assert isinstance(share, float) and 0.0 <= share <= 1.0
        assert row["on_held_out"]["target_words"] is not None
    # The dense stage: Table 1 for both victims, transfer rows, into captioning with the baseline as the captioner.
    dense = results["dense"]
    assert {"clean_map50", "adv_map50", "perm_map50", "iterations", "p"} <= set(dense["detector"])
    assert {"clean_miou", "adv_miou", "perm_miou", "iterations", "p"} <= set(dense["segmenter"])
    assert dense["victims"]["captioner"]["checkpoint"] == "given" and len(dense["transfer"]) == 6
    assert set(dense["victims"]) == {"detector", "segmenter", "captioner"}  # smoke: no second run or architecture
    assert {s["perturbation"] for s in dense["into_captioning"]} == {"detector", "segmenter", "detector+segmenter"}
    assert "captioner" in dense or "content word" in dense["captioner_not_run"]
    assert results["dense_study"]["config"]["images"] == 3
    # The freeze stage runs the pretrained-parts regime from parts it pretrained on the demo's data (read as COCO).
    freeze = results["freeze_study"]
    assert freeze["config"]["start"] == "pretrained" and list(freeze["regimes"]) == ["pretrained"]
    regime = freeze["regimes"]["pretrained"]
    assert regime["cross_attention"] == "both" and regime["rows"] == freeze["rows"]
    parts = regime["parts"]
    assert parts["made_here"] is True and parts["seconds"] > 0 and parts["settings"]["batch_size"] == 16
    for part, model_type in (("encoder_dir", "vit"), ("decoder_dir", "gpt2")):
        assert Path(parts[part]).parent == out / "freeze_study" / "parts"
        assert json.loads((Path(parts[part]) / "config.json").read_text())["model_type"] == model_type
    assert [r["name"] for r in freeze["rows"]] == [
        "baseline", "adversarial_only", "adversarial_training", "freeze_encoder", "freeze_decoder",
        "freeze_decoder_train_cross_attention",
    ]  # fmt: skip
    for row in freeze["rows"]:
        assert row["trials"] == 1 and row["parameter_groups"]["cross_attention"]["new"] is True
        assert {"clean", "adversarial"} <= set(row["test"]) and row["train_seconds"] > 0

    report = (out / "report.html").read_text()
    assert "Show-and-Fool" in report and "Stages" in report and "Dense study" in report
    assert "Baseline" in report and report.count("data:image/png;base64,") >= 2  # curves + test grid
    assert (data / "meta.json").is_file()  # the data was created because it was missing


def _failing(error: Exception) -> demo.DemoStage:
    def stage(ctx: demo.DemoContext) -> None:
        ctx.results["partial"] = "written before the failure"
        raise error

    return stage


def _never_run(ctx: demo.DemoContext) -> None:
    raise AssertionError("a stage after a failed one ran")


def _failing_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[str]:
    """The demo's arguments, with the data stage kept and the Show-and-Fool stage failing with ``error``."""
    monkeypatch.chdir(tmp_path)
    stages = [("data", demo.stage_data), ("show_and_fool", _failing(error)), ("transfer_study", _never_run)]
    monkeypatch.setattr(demo, "STAGES", stages)
    return ["demo", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "shapes"), "--profile", "smoke"]


def _stages(tmp_path: Path) -> dict:
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["dataset"]["name"] == "shapes" and results["partial"] == "written before the failure"
    assert (tmp_path / "demo" / "report.html").is_file()
    assert results["stages"]["data"]["status"] == "ok"
    assert results["stages"]["transfer_study"] == {
        "status": "skipped",
        "seconds": 0.0,
        "reason": "not run: stage 'show_and_fool' failed",
    }
    return results["stages"]["show_and_fool"]


def test_a_stage_failing_on_bad_input_ends_the_demo_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _failing_demo(tmp_path, monkeypatch, RobucapError("no image offers a target"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars come before the error line
    assert err[-1] == "robucap: error: demo stage 'show_and_fool' failed: no image offers a target"
    assert sum(line.startswith("robucap: error") for line in err) == 1
    record = _stages(tmp_path)
    assert record["status"] == "failed" and record["error"] == "RobucapError: no image offers a target"


def test_a_bug_in_a_stage_keeps_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _failing_demo(tmp_path, monkeypatch, RuntimeError("a bug\nsecond line"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)
    assert "robucap: error" not in capsys.readouterr().err
    record = _stages(tmp_path)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: a bug"


def test_show_and_fool_targets_are_decided_by_a_check() -> None:
    alike = ["a red circle", "a red circle", "a red circle"]
    references = [["a red circle", "a blue square above a green triangle"], ["a red circle"], ["a red circle"]]
    tokenizer = build_word_tokenizer([r for refs in references for r in refs])

    skip = demo.mode_targets(alike, references, tokenizer, 1, "paper", seed=0)
    assert skip == demo.ModeTargets(
        skip="no image gets a paper-style target: no other image's clean caption offers 1 new content words"
    )
    assert demo.mode_targets(["a red circle", "a blue square"], references[:2], tokenizer, 0, "paper", 0) == (
        demo.ModeTargets()  # paper-style targets: the attack draws them itself
    )
    fixed = demo.mode_targets(alike, references, tokenizer, 0, "references", 0)
    assert fixed.options == ["--target", "a blue square above a green triangle"] and fixed.skip is None
    keywords = demo.mode_targets(alike, references, tokenizer, 3, "references", 0)
    assert keywords.options == ["--keywords", "blue,square,green"]
    assert demo.mode_targets(alike, references, tokenizer, 5, "references", 0).skip == (
        "no reference caption offers 5 new content words that a clean caption lacks"
    )
