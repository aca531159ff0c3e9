"""`robucap study transfer` end to end on the smoke profile: trained and checkpointed models, every key, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.studies.transfer import ENSEMBLE_METHODS, TransferStudyConfig

NAMES = ["vit_gpt2_s0", "vit_gpt2_s1", "sat_s0"]
CELL = {"bleu4_clean", "bleu4_adv", "bleu4_drop", "changed", "target_hit", "target_hit_clean", "ori_bleu4",
        "tgt_bleu4", "n", "rmsd"}  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("transfer")
    out = tmp / "study"
    args = ["study", "transfer", "--out", str(out), "--profile", "smoke", "--data.root", str(tmp / "shapes"),
            "--data.image_size", "32", "--study.wandb", "false"]  # fmt: skip
    assert main(args) == 0
    return out


def _check_results(results: dict, names: list[str], n_images: int = 4) -> None:
    transfer = results["transfer"]
    assert [m["name"] for m in transfer["models"]] == names
    for model in transfer["models"]:
        assert 0.0 <= model["test_bleu4"] <= 1.0 and Path(model["checkpoint"]).is_file()
    for kind in ("targeted", "non_targeted"):
        matrix = transfer["matrix"][kind]
        # results.json is written with sorted keys.
        assert sorted(matrix) == sorted(names) and all(sorted(row) == sorted(names) for row in matrix.values())
        for row in matrix.values():
            for cell in row.values():
                assert set(cell) == CELL and cell["n"] == n_images and 0.0 <= cell["changed"] <= 1.0
                assert (cell["target_hit"] is None) == (kind == "non_targeted")
        assert set(transfer["rmsd"][kind]) == set(names)
    rows = results["ensemble"]["rows"]
    # Every model held out once, targeted and not, three methods each.
    assert len(rows) == len(names) * 2 * len(ENSEMBLE_METHODS)
    for row in rows:
        assert row["held_out"] not in row["members"] and len(row["members"]) == len(names) - 1
        assert set(row["on_members"]) == set(row["members"]) and set(row["on_held_out"]) == CELL
        assert (row["epsilon"] is None) == (row["method"] == "optimization")
        assert row["rmsd"] >= 0
        single = row["single_model_transfer"]
        assert single["sources"] == row["members"] and single["best"]["source"] in row["members"]
        assert single["attack"] == ("show_and_fool" if row["targeted"] else "optimization")


def test_study_transfer_smoke(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    _check_results(results, NAMES)
    assert results["transfer"]["models"][2]["arch"] == "show_attend_tell"
    assert [m["seed"] for m in results["transfer"]["models"]] == [0, 1, 0]
    assert results["config"]["sf_iterations"] == 4 and results["config"]["images"] == 4
    html = (smoke_run / "report.html").read_text()
    assert "Transfer study" in html and "Leave-one-out ensembles" in html
    assert html.count("data:image/png;base64,") == 1


def test_study_transfer_from_checkpoints(smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoints = [str(smoke_run / "checkpoints" / name / "best.ckpt") for name in NAMES]
    out = tmp_path / "from_checkpoints"
    args = ["study", "transfer", "--out", str(out), "--profile", "smoke", "--data.root",
            str(smoke_run.parent / "shapes"), "--data.image_size", "32", "--study.wandb", "false", "--study.images",
            "3", "--study.checkpoints", json.dumps(checkpoints)]  # fmt: skip
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("robucap study transfer done") and "ensemble on held-out" in last
    results = json.loads((out / "results.json").read_text())
    _check_results(results, NAMES, n_images=3)  # names come from the run directories of best.ckpt
    assert [m["seed"] for m in results["transfer"]["models"]] == [None, None, None]
    assert not (out / "checkpoints").exists()  # nothing was trained


def test_too_few_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["study", "transfer", "--out", str(tmp_path), "--profile", "smoke", "--study.checkpoints",
                 "[a.ckpt, b.ckpt]"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("robucap: error: transfer study checkpoints needs at least 3 captioners")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 1}, "images must be >= 2"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"fast_rmsd": 300.0}, r"fast_rmsd must be in \(0, 255\]"),
        ({"models": (("a", "lstm", 0), ("b", "vit_gpt2", 1), ("c", "vit_gpt2", 2))}, "arch must be one of"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        TransferStudyConfig(**kwargs)


def test_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "transfer", "--out", "o", "--profile", "fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        "robucap: error: unknown --profile 'fast'; expected one of ['full', 'quick', 'smoke']"
    )


def test_more_images_than_the_test_split(smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["study", "transfer", "--out", str(tmp_path), "--profile", "smoke", "--data.root",
            str(smoke_run.parent / "shapes"), "--data.image_size", "32", "--study.wandb", "false", "--study.images",
            "20"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "robucap: error: study stage 'transfer' failed: transfer study images (20) exceeds the 8 test images; "
        "lower --study.images"
    )
    assert not (tmp_path / "checkpoints").exists()  # checked before any training
