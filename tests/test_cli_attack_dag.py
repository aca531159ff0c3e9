"""``robucap attack dag``: DAG (Xie et al. 2017) on a captioner end to end, its figures consistent, and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_app.attack.dag import RUNNERS
from lightning_app.cli import main
from modules.dense import VICTIM_KEY

GAMMA = 4 / 255  # larger than the paper's step, so that a few iterations flip words of the tiny captioner
ITERATIONS = 12
SIDE = 32  # the shapes_root images


def _run(checkpoint: Path, root: Path, out: Path, batch_size: int) -> dict[str, Any]:
    argv = ["attack", "dag", "--ckpt", str(checkpoint), "--data_root", str(root), "--images", "4", "--batch_size",
            str(batch_size), "--gamma", str(GAMMA), "--max_iterations", str(ITERATIONS), "--examples", "2",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def dag_run(distinct_checkpoint: Path, shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dag") / "run"
    _run(distinct_checkpoint, shapes_root, out, batch_size=3)
    return out


def test_captioner_figures_are_consistent(dag_run: Path) -> None:
    results = json.loads((dag_run / "results.json").read_text())
    block = results["dense"]["captioner"]
    records = block["records"]
    attacked = [r for r in records if r["targets"] > 0]
    assert len(records) == 4 and block["n"] == len(attacked) > 0 and block["skipped"] == 4 - len(attacked)
    # Flip rate: flipped targets over all targets, recounted from the per-image records.
    assert block["targets"] == sum(r["targets"] for r in attacked)
    assert block["fooled"] == sum(r["fooled"] for r in attacked) > 0
    assert block["token_flip_rate"] == pytest.approx(block["fooled"] / block["targets"])
    assert 0.0 < block["token_flip_rate"] <= 1.0
    # A flipped word changes the greedy caption: decoding reaches its position with the clean prefix, or diverged.
    for r in attacked:
        assert not r["fooled"] or r["changed"], r
        assert r["success"] == (r["fooled"] == r["targets"])
    assert block["changed"] == pytest.approx(sum(r["changed"] for r in attacked) / len(attacked))
    assert block["changed"] > 0
    assert block["bleu4_drop"] == pytest.approx(block["bleu4_clean"] - block["bleu4_adv"])
    # Perceptibility sqrt(1/K sum ||r_k||^2) is l2 / sqrt(K), K = H * W pixels.
    assert results["data"]["image_size"] == SIDE
    for r in attacked:
        assert r["p"] == pytest.approx(r["l2"] / math.sqrt(SIDE * SIDE), rel=1e-6)
        # Every step's L-infinity norm is gamma, so the sum of the steps is at most iterations * gamma.
        assert 0 < r["iterations"] <= ITERATIONS and r["linf"] <= r["iterations"] * GAMMA + 1e-6
    assert block["p"] == pytest.approx(sum(r["p"] for r in attacked) / len(attacked))
    assert block["iterations"] == pytest.approx(sum(r["iterations"] for r in attacked) / len(attacked))
    assert block["max_iterations"] == ITERATIONS and block["gamma"] == pytest.approx(GAMMA)
    # FGSM at DAG's mean L-infinity norm, with its own figures.
    fgsm = block["fgsm"]
    assert fgsm["epsilon"] == block["linf"] == pytest.approx(sum(r["linf"] for r in attacked) / len(attacked))
    assert 0.0 <= fgsm["changed"] <= 1.0
    assert fgsm["bleu4_drop"] == pytest.approx(block["bleu4_clean"] - fgsm["bleu4_adv"])
    assert results["settings"]["victim"] == "captioner" and results["settings"]["max_iterations"] == ITERATIONS
    report = (dag_run / "report.html").read_text()
    assert "<td>FGSM</td>" in report and "<td>DAG</td>" in report and "data:image/png" in report


def test_an_image_gets_the_same_perturbation_in_any_batch(
    dag_run: Path, distinct_checkpoint: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """Image k's adversarial words are seeded with seed + k, so batches of 3 + 1 and of 4 give the same records."""
    together = _run(distinct_checkpoint, shapes_root, tmp_path / "one_batch", batch_size=4)["dense"]["captioner"]
    split = json.loads((dag_run / "results.json").read_text())["dense"]["captioner"]
    keys = ("image_id", "targets", "fooled", "iterations", "adversarial")
    assert [{k: r[k] for k in keys} for r in together["records"]] == [{k: r[k] for k in keys} for r in split["records"]]
    assert [r["l2"] for r in together["records"]] == pytest.approx([r["l2"] for r in split["records"]], rel=1e-4)


def _dense_checkpoint(path: Path, victim: str) -> Path:
    """A file marked as a dense victim's checkpoint, as its module's ``on_save_checkpoint`` marks it."""
    torch.save({VICTIM_KEY: {"victim": victim, "class_path": f"modules.{victim}.Module"}, "state_dict": {}}, path)
    return path


@pytest.mark.parametrize(
    ("options", "victim_file", "message"),
    [
        (["--victim", "classifier"], None, "--victim must be one of captioner, detector, segmenter, got 'classifier'"),
        (["--gamma", "0"], None, "--gamma (DAG's step, [0, 1] pixel units) must be > 0, got 0.0"),
        (["--gamma", "-0.01"], None, "--gamma (DAG's step, [0, 1] pixel units) must be > 0, got -0.01"),
        (["--max_iterations", "0"], None, "--max_iterations must be >= 1, got 0"),
        (["--reselect_every", "-2"], None, "--reselect_every must be >= 0 (0: the paper's fixed proposals), got -2"),
        (["--victim", "segmenter", "--margin", "-1"], None, "--margin must be >= 0 (0: the paper's rule), got -1.0"),
        (["--margin", "2"], None, "--margin applies to --victim detector and segmenter; the captioner's DAG has none"),
        (["--victim", "segmenter", "--reselect_every", "5"], None,
         "--reselect_every re-selects a detector's proposals; --victim segmenter has none"),
        (
            ["--victim", "detector"],
            None,
            "holds a captioner, not a detector; give a detector checkpoint or --victim captioner",
        ),  # fmt: skip
        (["--victim", "segmenter"], None, "holds a captioner, not a segmenter"),
        (
            ["--victim", "captioner"],
            "detector",
            "holds a detector, not a captioner; give a captioner checkpoint or --victim detector",
        ),  # fmt: skip
        (["--victim", "detector"], "segmenter", "holds a segmenter, not a detector"),
    ],
)
def test_bad_input_is_one_line(
    options: list[str],
    victim_file: str | None,
    message: str,
    distinct_checkpoint: Path,
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = distinct_checkpoint if victim_file is None else _dense_checkpoint(tmp_path / "v.ckpt", victim_file)
    argv = ["attack", "dag", "--ckpt", str(checkpoint), "--data_root", str(shapes_root), "--out", str(tmp_path / "o")]
    assert main([*argv, *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_a_victim_without_runner_is_one_line(
    tmp_path: Path, shapes_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seam: a victim whose runner is not registered is refused by name."""
    monkeypatch.delitem(RUNNERS, "segmenter")
    checkpoint = _dense_checkpoint(tmp_path / "v.ckpt", "segmenter")
    argv = ["attack", "dag", "--victim", "segmenter", "--ckpt", str(checkpoint), "--data_root", str(shapes_root)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "robucap attack dag --victim segmenter has no runner; victims available: captioner, detector" in err
    assert "\n" not in err and not (tmp_path / "o").exists()
