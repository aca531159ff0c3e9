"""Captioners by injection: a new captioner is one python file plus one YAML, trained through ``robucap fit``.

The toy captioner lives in ``tests/helpers/toy_captioner.py`` and its config in ``tests/fixtures/toy_captioner.yaml``;
no robucap file names it. Also: the settings' dict form (what YAML files and checkpoints hold) and its errors.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from helpers.toy_captioner import ToyCaptioner, ToySettings

from datamodules.errors import RobucapError
from lightning_app.cli import main
from lightning_app.lightning_cli import run_lightning_cli
from modules.captioners import (
    ShowAttendTellSettings,
    ViTGPT2Settings,
    registered_captioners,
    resolve_captioner_settings,
)
from modules.captioning import CaptioningModule

REPO = Path(__file__).resolve().parents[1]
TOY_YAML = REPO / "tests" / "fixtures" / "toy_captioner.yaml"


def _fit_args(root: Path, out: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        "--config", str(TOY_YAML),
        "--data.format", "coco", "--data.root", str(root), "--data.image_size", "32",
        "--data.batch_size", "32", "--data.progress", "false",
        "--trainer.default_root_dir", str(out), "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_toy_captioner_trains_through_robucap_fit_and_its_checkpoint_validates(
    shapes_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cli = run_lightning_cli(["fit", *_fit_args(shapes_root, out)])
    module = cli.model
    assert isinstance(module.captioner, ToyCaptioner)
    assert module.architecture == "toy_gru"
    assert module.hparams.captioner == {
        "class_path": "helpers.toy_captioner.ToySettings",
        "init_args": {"hidden_dim": 48},
    }
    (epoch_loss,) = [float(row["train/epoch_loss"]) for row in _csv_rows(out) if row.get("train/epoch_loss")]
    # It learned: one epoch takes the loss well below guessing among the vocabulary's words.
    uniform = math.log(len(module.tokenizer))
    assert epoch_loss < 0.8 * uniform, (epoch_loss, uniform)

    # The checkpoint holds plain data only, and rebuilds the toy captioner from it.
    last = next(out.rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["captioner"]["class_path"] == "helpers.toy_captioner.ToySettings"
    loaded = CaptioningModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    assert isinstance(loaded.captioner, ToyCaptioner)
    for name, value in module.captioner.state_dict().items():
        assert torch.equal(loaded.captioner.state_dict()[name], value.cpu()), name
    validated = run_lightning_cli(
        ["validate", "--data.format", "coco", "--data.root", str(shapes_root), "--data.batch_size", "32",
         "--data.progress", "false", "--trainer.default_root_dir", str(tmp_path / "validate"), "--trainer.logger",
         "false", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(last)]
    )  # fmt: skip
    assert isinstance(validated.model.captioner, ToyCaptioner)
    assert float(validated.trainer.callback_metrics["val/loss"]) < 0.8 * uniform


def _csv_rows(out: Path) -> list[dict[str, str]]:
    (metrics,) = (out / "csv").rglob("metrics.csv")
    with metrics.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_settings_resolve_from_objects_dicts_and_names() -> None:
    assert registered_captioners()["toy_gru"] is ToySettings
    toy = ToySettings(hidden_dim=8)
    assert resolve_captioner_settings(toy) is toy
    assert resolve_captioner_settings(toy.to_dict()) == toy
    assert resolve_captioner_settings({"class_path": "toy_gru", "init_args": {"hidden_dim": 8}}) == toy
    assert resolve_captioner_settings("show_attend_tell") == ShowAttendTellSettings()
    sat = ShowAttendTellSettings(preset="tiny", overrides={"decoder": {"hidden_dim": 16}})
    assert resolve_captioner_settings(sat.to_dict()) == sat
    assert ViTGPT2Settings().to_dict()["class_path"] == "modules.captioners.vit_gpt2.ViTGPT2Settings"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"class_path": "lstm"}, r"class_path 'lstm' is not a registered name \(\[.*'show_attend_tell'"),
        ({"class_path": "no_such_package.Settings"}, r"cannot import 'no_such_package'"),
        ({"class_path": "modules.captioning.CaptioningModule"}, "is not a registered name"),
        (
            {"class_path": "vit_gpt2", "init_args": {"encoder_weights": "x.pt"}},
            r"\['encoder_weights'\] are not options of ViTGPT2Settings",
        ),
        ({"preset": "tiny"}, r"model.captioner must be \{class_path"),
        ({"class_path": "vit_gpt2", "preset": "tiny"}, r"accepts the keys class_path and init_args, got \['preset'\]"),
    ],
)
def test_bad_captioner_settings_are_one_line_errors(spec: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        CaptioningModule(captioner=spec)


def test_unknown_captioner_option_on_the_command_line(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", *_fit_args(shapes_root, tmp_path), "--model.captioner", "vit_gpt3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("robucap: error: model.captioner class_path 'vit_gpt3' is not a registered name")


def test_a_short_name_as_a_config_files_class_path_is_one_line(
    shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """jsonargparse imports a config file's class_path itself; a short name there used to end in a traceback."""
    config = tmp_path / "captioner.yaml"
    config.write_text("model:\n  captioner:\n    class_path: show_attend_tell\n    init_args: {preset: tiny}\n")
    assert main(["fit", *_fit_args(shapes_root, tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("robucap: error: class_path 'show_attend_tell' is not a dotted import path")
    assert "captioner: show_attend_tell" in err[-1]
