"""`robucap study dense` end to end on the smoke profile: trained and checkpointed victims, every key, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_app.cli import main
from lightning_app.studies.dense import ROLES
from modules.dense_transfer import RELATIONS

TABLE1 = {"clean_map50", "adv_map50", "perm_map50", "iterations", "p", "n", "skipped", "success", "max_iterations"}
DENSE_ROLES = ("detector", "detector_2", "segmenter", "segmenter_2")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dense")
    out = tmp / "study"
    args = ["study", "dense", "--out", str(out), "--profile", "smoke", "--data.root", str(tmp / "shapes"),
            "--data.image_size", "32"]  # fmt: skip
    assert main(args) == 0
    return out


def test_study_dense_smoke_trains_five_victims_and_writes_every_table(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    dense = results["dense"]
    assert set(dense["victims"]) == set(ROLES)
    assert dense["victims"]["segmenter_2"]["arch"] == "lraspp_mobilenet_v3_large"
    assert [dense["victims"][r]["seed"] for r in ("detector", "detector_2")] == [0, 1]
    for role in ROLES:
        assert Path(dense["victims"][role]["checkpoint"]).is_file()
    assert TABLE1 <= set(dense["detector"]) and dense["detector"]["n"] == 3 == len(dense["image_ids"])
    assert {"clean_miou", "adv_miou", "perm_miou"} <= set(dense["segmenter"])
    assert dense["detector"]["max_iterations"] == 2 and dense["detector"]["iterations"] <= 2
    rows = dense["transfer"]
    assert {(r["source"], r["target"]) for r in rows} >= {
        ("detector", "detector"), ("detector", "detector_2"), ("detector", "segmenter"), ("segmenter", "segmenter_2"),
        ("segmenter", "detector"), ("detector+segmenter", "detector_2"), ("detector+segmenter", "segmenter_2"),
    }  # fmt: skip
    assert {r["relation"] for r in rows} == set(RELATIONS)
    for row in rows:
        assert row["metric"] == ("map50" if row["target"].startswith("detector") else "miou")
        assert row["n"] == 3 and row["drop"] == pytest.approx(row["clean"] - row["perturbed"])
    # The white-box rows are Table 1's own figures (same images, same r, same permutation seed).
    white = {r["target"]: r for r in rows if r["relation"] == "white-box"}
    assert white["detector"]["perturbed"] == pytest.approx(dense["detector"]["adv_map50"])
    assert white["segmenter"]["permuted"] == pytest.approx(dense["segmenter"]["perm_miou"])
    shifts = {s["perturbation"]: s for s in dense["into_captioning"]}
    assert set(shifts) == {"detector", "segmenter", "detector+segmenter"}
    for shift in shifts.values():
        # The noise control has the perturbation's L2 norm (less whatever clipping removes).
        assert 0 < shift["noise_p"] <= shift["p"] * 1.0001 and 0 <= shift["changed"] <= 1
    # A one-epoch captioner on 48 images says no content word: DAG on it is recorded as not run, with the reason.
    assert "content word" in dense["captioner_not_run"] and "captioner" not in dense
    html = (smoke_run / "report.html").read_text()
    assert "Table 1" in html and "Into captioning" in html and html.count("data:image/png;base64,") == 2


def test_study_dense_from_checkpoints_with_a_trained_captioner(
    smoke_run: Path, shapes_root: Path, distinct_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = {role: str(smoke_run / "checkpoints" / role / "best.ckpt") for role in DENSE_ROLES}
    checkpoints["captioner"] = str(distinct_checkpoint)
    out = tmp_path / "from_checkpoints"
    args = ["study", "dense", "--out", str(out), "--profile", "smoke", "--data.format", "coco", "--data.root",
            str(shapes_root), "--data.image_size", "32", "--study.images", "4", "--study.captioner_iterations", "20",
            "--study.checkpoints", json.dumps(checkpoints)]  # fmt: skip
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("robucap study dense done") and "captioner token flip" in last
    results = json.loads((out / "results.json").read_text())
    assert not (out / "checkpoints").exists()  # nothing was trained
    assert all(results["dense"]["victims"][r]["seed"] is None for r in ROLES)
    captioner = results["dense"]["captioner"]
    assert captioner["n"] >= 1 and 0 <= captioner["token_flip_rate"] <= 1 and captioner["max_iterations"] == 20
    assert {"token_flip_rate", "changed", "bleu4_drop", "p", "fgsm"} <= set(captioner)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--study.checkpoints", '{"detektor": "x.ckpt"}'], "--study.checkpoints has unknown roles ['detektor']"),
        (["--study.gamma", "0"], "--study.gamma (DAG's step, [0, 1] pixel units) must be > 0, got 0.0"),
        (["--study.detector_iterations", "0"], "--study.detector_iterations must be >= 1, got 0"),
        (["--study.other_segmenter_arch", "unet"], "--study.other_segmenter_arch must be one of"),
        (["--study.transfer_victims", "false", "--study.checkpoints", '{"segmenter_2": "x.ckpt"}'],
         "gives detector_2 or segmenter_2 but --study.transfer_victims is false"),
        (["--study.detector_reselect_every", "-1"], "--study.detector_reselect_every must be >= 0, got -1"),
    ],
)
def test_bad_settings_are_one_line_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study", "dense", "--profile", "smoke", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error:") and message in err and len(err.splitlines()) == 1


def test_a_captioner_checkpoint_in_a_detector_role_is_refused(
    smoke_run: Path, distinct_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = json.dumps({"detector": str(distinct_checkpoint)})
    args = ["study", "dense", "--profile", "smoke", "--out", str(tmp_path / "o"), "--data.root",
            str(smoke_run.parent / "shapes"), "--data.image_size", "32",
            "--study.checkpoints", checkpoints]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"--study.checkpoints.detector: {distinct_checkpoint} holds no dense victim" in err
    assert "expected a detector" in err and len(err.splitlines()) == 1


def test_more_images_than_the_test_split_holds_is_refused(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = {role: str(smoke_run / "checkpoints" / role / "best.ckpt") for role in ROLES}
    args = ["study", "dense", "--profile", "smoke", "--out", str(tmp_path / "o"), "--data.root",
            str(smoke_run.parent / "shapes"), "--data.image_size", "32", "--study.images", "50",
            "--study.checkpoints", json.dumps(checkpoints)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than --study.images 50" in err and len(err.splitlines()) == 1
