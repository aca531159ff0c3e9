"""`robucap study freeze` end to end on the smoke profile: the five rows with every documented key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datamodules.errors import RobucapError
from datamodules.pretraining import generated_shapes_options
from lightning_app.cli import main
from lightning_app.studies.base import StudyData
from lightning_app.studies.freeze import FREEZE_DECODER_CROSS, PHASES, FreezeStudy, FreezeStudyConfig
from lightning_app.studies.freeze_pretrained import (
    GROUPS,
    Parts,
    check_part_dirs,
    make_parts,
    parameter_groups,
    resolve_parts,
)

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
    assert rows["freeze_encoder"]["trials"] == rows["adversarial_only"]["trials"] == 2
    assert rows["baseline"]["trials"] == 1 and block["regimes"]["baseline"]["cross_attention"] == "decoder"
    assert block["regimes"]["baseline"]["rows"] == block["rows"] and block["regimes"]["baseline"]["parts"] is None
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


# -- the pretrained-parts regime (--study.start pretrained) ---------------------------------------------------------

SMOKE_SHAPES = {"n_train": 48, "n_val": 8, "n_test": 8}  # configs/study/freeze_smoke.yaml's data


@pytest.fixture(scope="module")
def smoke_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Parts]:
    """The smoke profile's shapes data (32 px) and parts pretrained on it by the study's own pretraining."""
    from datamodules.datamodule import CaptionDataModule

    base = tmp_path_factory.mktemp("freeze_pretrained")
    root = base / "shapes"
    dm = CaptionDataModule(format="shapes", root=str(root), image_size=32, shapes=SMOKE_SHAPES, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    settings = {"encoder_epochs": 1.0, "decoder_epochs": 1.0, "lr": 2e-3, "batch_size": 16}
    parts = make_parts(dm, base / "study", settings)
    return root, parts


def test_the_study_pretrains_the_parts_under_its_directory(smoke_parts: tuple[Path, Parts]) -> None:
    root, parts = smoke_parts
    assert parts.made_here and parts.settings["encoder_epochs"] == 1.0 and parts.seconds > 0
    assert parts.encoder_dir.endswith("study/parts/encoder") and parts.decoder_dir.endswith("study/parts/decoder")
    assert json.loads((Path(parts.encoder_dir) / "config.json").read_text())["model_type"] == "vit"
    assert json.loads((Path(parts.decoder_dir) / "config.json").read_text())["model_type"] == "gpt2"
    check_part_dirs(parts.encoder_dir, parts.decoder_dir)  # the study's own check accepts them


def _pretrained_args(out: Path, root: Path, parts: Parts, *extra: str) -> list[str]:
    return ["study", "freeze", "--out", str(out), "--profile", "smoke", "--data.root", str(root),
            "--data.image_size", "32", "--study.wandb", "false", "--study.start", "pretrained",
            "--study.encoder_dir", parts.encoder_dir, "--study.decoder_dir", parts.decoder_dir, *extra]  # fmt: skip


def test_study_freeze_pretrained_regime_smoke(smoke_parts: tuple[Path, Parts], tmp_path: Path) -> None:
    root, parts = smoke_parts
    out = tmp_path / "study"
    args = _pretrained_args(out, root, parts, "--study.trials", "1", "--study.cross_attention", "both")
    assert main(args) == 0
    block = json.loads((out / "results.json").read_text())["freeze_study"]
    assert block["config"]["start"] == "pretrained" and list(block["regimes"]) == ["pretrained"]
    regime = block["regimes"]["pretrained"]
    assert regime["cross_attention"] == "both"
    assert regime["rows"] == block["rows"] and regime["new_groups"] == ["cross_attention", "projection"]
    assert regime["parts"]["made_here"] is False and regime["parts"]["encoder_dir"] == parts.encoder_dir
    rows = {r["name"]: r for r in block["rows"]}
    assert list(rows) == [*PHASES, FREEZE_DECODER_CROSS]
    groups = {name: row["parameter_groups"] for name, row in rows.items()}
    for name, row in rows.items():
        assert row["trials"] == 1 and row["test"]["n_images"] == 8 and row["train_seconds"] > 0
        assert set(row["parameter_groups"]) == set(GROUPS)
        assert row["trainable_params"] == sum(g["trainable"] for g in groups[name].values())
        cross = groups[name]["cross_attention"]
        assert cross["new"] is True and cross["params"] > 0 and groups[name]["encoder"]["new"] is False
        # Only freezing the whole decoder freezes its new cross-attention.
        assert cross["trainable"] == (0 if name == "freeze_decoder" else cross["params"])
    assert groups["freeze_encoder"]["encoder"]["trainable"] == 0
    for name in ("freeze_decoder", FREEZE_DECODER_CROSS):
        assert groups[name]["decoder_blocks"]["trainable"] == groups[name]["embeddings"]["trainable"] == 0
        assert groups[name]["encoder"]["trainable"] == groups[name]["encoder"]["params"]
    assert rows["baseline"]["checkpoint"].endswith("pretrained_baseline/best.ckpt")
    assert "Regime: pretrained" in (out / "report.html").read_text()


def _swap(parts: Parts) -> list[str]:
    return ["--study.encoder_dir", parts.decoder_dir, "--study.decoder_dir", parts.encoder_dir]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda p: _swap(p), "--study.encoder_dir {dec} holds a 'gpt2' model; expected a ViT ('vit')"),
        (
            lambda p: ["--study.encoder_dir", "/no/such/dir"],
            "--study.encoder_dir /no/such/dir is not a save_pretrained directory (no config.json there)",
        ),
        (
            lambda p: ["--study.arch", "show_attend_tell"],
            "--study.start pretrained needs --study.arch vit_gpt2 (pretrained ViT + GPT-2 parts), not show_attend_tell",
        ),
        (
            lambda p: ["--study.start", "baseline"],
            "--study.encoder_dir / --study.decoder_dir need --study.start pretrained",
        ),
        (
            lambda p: ["--study.cross_attention", "encoder"],
            "--study.cross_attention must be one of ['auto', 'decoder', 'trainable', 'both'], got 'encoder'",
        ),
    ],
    ids=["swapped", "missing", "show_attend_tell", "dirs_without_pretrained", "cross_attention"],
)
def test_bad_pretrained_settings_are_one_line_errors(
    smoke_parts: tuple[Path, Parts], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra, message: str
) -> None:
    root, parts = smoke_parts
    assert main(_pretrained_args(tmp_path / "study", root, parts, *extra(parts))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "robucap: error: " + message.format(dec=parts.decoder_dir)


def test_one_part_directory_without_the_other() -> None:
    with pytest.raises(RobucapError, match="--study.encoder_dir and --study.decoder_dir go together"):
        FreezeStudyConfig(start="pretrained", decoder_dir="somewhere")


def test_a_decoder_with_another_vocabulary_is_refused(smoke_parts: tuple[Path, Parts], tmp_path: Path) -> None:
    from datamodules.datamodule import CaptionDataModule
    from datamodules.tokenizer import build_word_tokenizer

    root, parts = smoke_parts
    dm = CaptionDataModule(format="shapes", root=str(root), image_size=32, shapes=SMOKE_SHAPES, progress=False)
    dm.tokenizer = build_word_tokenizer(["a small red zebra"])
    with pytest.raises(RobucapError, match="has another tokenizer than the study's data"):
        resolve_parts(dm, tmp_path, parts.encoder_dir, parts.decoder_dir, {})


def test_shapes_data_read_as_coco_gets_its_parts_made(smoke_parts: tuple[Path, Parts], tmp_path: Path) -> None:
    """The demo reads its shapes data as COCO: the parts are pretrained with the settings the dataset was made with."""
    from datamodules.datamodule import CaptionDataModule

    root, _ = smoke_parts
    recorded = generated_shapes_options(root)
    assert recorded is not None and recorded["image_size"] == 32
    assert {k: recorded[k] for k in SMOKE_SHAPES} == SMOKE_SHAPES
    dm = CaptionDataModule(format="coco", root=str(root), image_size=32, batch_size=16, progress=False)
    dm.setup("fit")
    settings = {"encoder_epochs": 0.5, "decoder_epochs": 0.5, "lr": 2e-3, "batch_size": 16}
    parts = make_parts(dm, tmp_path / "study", settings)
    assert parts.made_here and parts.settings == settings
    check_part_dirs(parts.encoder_dir, parts.decoder_dir)
    # The decoder was pretrained with the data module's own tokenizer, so the study accepts it as given parts too.
    assert resolve_parts(dm, tmp_path / "again", parts.encoder_dir, parts.decoder_dir, {}).made_here is False


def test_parts_are_not_made_from_data_that_is_not_generated_shapes(tmp_path: Path) -> None:
    from datamodules.datamodule import CaptionDataModule

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    assert generated_shapes_options(coco) is None  # no meta.json
    (coco / "meta.json").write_text(json.dumps({"name": "shapes", "config": {"n_train": -1}}))
    assert generated_shapes_options(coco) is None  # settings the generator refuses
    (coco / "meta.json").write_text(json.dumps({"name": "shapes", "complete": True, "config": {"n_train": 4}}))
    assert generated_shapes_options(coco) is None  # the annotations files are missing
    dm = CaptionDataModule(format="coco", root=str(coco), image_size=32, progress=False)
    message = f"the data ('coco' at {coco}) is not a generated shapes dataset: pass pretrained directories"
    with pytest.raises(RobucapError, match=re.escape(message)):
        make_parts(dm, tmp_path / "study", {})


def test_parameter_groups_cover_every_parameter_once() -> None:
    from datamodules.tokenizer import build_word_tokenizer
    from modules.captioning import CaptioningModule

    module = CaptioningModule.with_tokenizer(build_word_tokenizer(["a red circle"]), image_size=32)
    groups = parameter_groups(module.captioner)
    assert sum(g["params"] for g in groups.values()) == sum(p.numel() for p in module.captioner.parameters())
    assert groups["cross_attention"]["params"] > 0 and groups["projection"]["params"] == 0  # tiny: equal widths
    assert all(g["trainable"] == g["params"] and not g["new"] for g in groups.values())
