"""`robucap study transfer` end to end on the smoke profile: trained and checkpointed models, every key, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.studies.transfer import ENSEMBLE_METHODS, TransferStudyConfig
from modules.transfer import TransferCell
from modules.transfer_study import on_members

NAMES = ["vit_gpt2_s0", "vit_gpt2_s1", "vit_gpt2_wide_s2", "sat_s0", "sat_s1"]
CELL = {"bleu4_clean", "bleu4_adv", "bleu4_drop", "changed", "target_hit", "target_hit_clean", "target_words",
        "target_words_clean", "ori_bleu4", "tgt_bleu4", "n", "rmsd"}  # fmt: skip
KINDS = ("targeted", "targeted_optimization", "non_targeted")
TWO_VITS = ({"name": "b", "arch": "vit_gpt2"}, {"name": "c", "arch": "vit_gpt2", "seed_offset": 1})


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
    assert sorted(transfer["matrix"]) == sorted(KINDS)
    for kind in KINDS:
        matrix = transfer["matrix"][kind]
        # results.json is written with sorted keys.
        assert sorted(matrix) == sorted(names) and all(sorted(row) == sorted(names) for row in matrix.values())
        for row in matrix.values():
            for cell in row.values():
                assert set(cell) == CELL and cell["n"] == n_images and 0.0 <= cell["changed"] <= 1.0
                assert (cell["target_hit"] is None) == (kind == "non_targeted")
                assert (cell["target_words"] is None) == (kind == "non_targeted")
        assert set(transfer["rmsd"][kind]) == set(names)
    rows = results["ensemble"]["rows"]
    # Every model held out once, targeted and not, three methods each.
    assert len(rows) == len(names) * 2 * len(ENSEMBLE_METHODS)
    for row in rows:
        assert row["held_out"] not in row["members"] and len(row["members"]) == len(names) - 1
        members = row["on_members"]
        assert set(members["models"]) == set(row["members"]) and set(row["on_held_out"]) == CELL
        assert all(set(cell) == CELL for cell in members["models"].values())
        # Every member at once can only be as fooled as the least fooled member.
        key = "target_hit" if row["targeted"] else "changed"
        assert 0.0 <= members[key] <= min(cell[key] for cell in members["models"].values())
        assert (members["target_hit"] is None) == (not row["targeted"])
        assert (row["on_held_out"]["target_hit"] is None) == (not row["targeted"])
        assert row["objective"] == ("sum_margin" if row["targeted"] else "mixture")
        assert (row["epsilon"] is None) == (row["method"] == "optimization")
        assert row["rmsd"] >= 0
        single = row["single_model_transfer"]
        assert single["sources"] == row["members"] and single["best"]["source"] in row["members"]
        assert single["attack"] == "optimization"
        assert ("single_model_show_and_fool" in row) == row["targeted"]


def test_study_transfer_smoke(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    _check_results(results, NAMES)
    models = results["transfer"]["models"]
    assert [m["arch"] for m in models] == ["vit_gpt2"] * 3 + ["show_attend_tell"] * 2
    assert [m["seed"] for m in models] == [0, 1, 2, 0, 1]
    # The wide ViT-GPT2 is another size: more parameters than the tiny preset.
    assert models[2]["overrides"]["encoder"]["hidden_size"] == 96 and models[2]["parameters"] > models[0]["parameters"]
    assert results["config"]["sf_iterations"] == 4 and results["config"]["images"] == 4
    assert results["config"]["targeted_iterations"] == 3 and results["config"]["stop_on_success"] is True
    assert "stop_on_success=True" in results["transfer"]["attacks"]["targeted_optimization"]
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
    assert [m["seed"] for m in results["transfer"]["models"]] == [None] * 5
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
        ({"models": ({"name": "a", "arch": "lstm"}, *TWO_VITS)}, "arch must be one of"),
        ({"models": ({"name": "a", "arch": "vit_gpt2"},) * 3}, "model names must be unique"),
        ({"models": TWO_VITS}, "at least 3 models"),
        ({"targeted_lr": 0.0}, "targeted_lr must be > 0"),
        ({"targeted_iterations": 0}, "targeted_iterations must be >= 1"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        TransferStudyConfig(**kwargs)


def _cell(clean: list[str], adversarial: list[str], words: float | None) -> TransferCell:
    n = len(clean)
    return TransferCell(
        bleu4_clean=0.0, bleu4_adv=0.0, bleu4_drop=0.0, changed=0.0, target_hit=None, target_hit_clean=None,
        target_words=words, target_words_clean=None, ori_bleu4=0.0, tgt_bleu4=None, rmsd=1.0, n=n,
        clean_captions=clean, adversarial_captions=adversarial,
    )  # fmt: skip


def test_on_members_counts_images_fooled_on_every_member() -> None:
    """Member a gives the target on images 0 and 1, member b on 1 and 2: only image 1 is a hit on every member."""
    targets = ["a red circle", "a blue square", "a green star"]
    clean = ["a cross", "a cross", "a cross"]
    cells = {
        "a": _cell(clean, ["A red circle.", "a blue square", "a cross"], 0.5),
        "b": _cell(clean, ["a dot", "a blue square", "a green star"], 0.25),
    }
    verdict = on_members(cells, targets)
    assert verdict["target_hit"] == pytest.approx(1 / 3)  # normalised text: "A red circle." is the target
    assert verdict["changed"] == pytest.approx(2 / 3)  # image 2 is unchanged on a
    assert verdict["target_words"] == pytest.approx(0.375) and set(verdict["models"]) == {"a", "b"}
    assert on_members(cells, None)["target_hit"] is None


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
