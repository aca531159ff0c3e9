"""Checkpoints written before captioners were injected still load, as the captioner they were trained as.

Such a checkpoint names its captioner with flat model settings (``arch``, ``preset``, ``overrides``...) instead of
``captioner: {class_path, init_args}``. ``CaptioningModule`` no longer takes those arguments, so Lightning dropped
them and built the default tiny ViT-GPT2: a Show-Attend-Tell checkpoint failed to load, a ViT-GPT2 one with
overrides too. The files here are written the way that version saved them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.tokenizer import tokenizer_to_state
from lightning_app.cli import main
from lightning_app.lightning_cli import run_lightning_cli
from modules.captioners import CaptionerSettings, ShowAttendTellSettings, ViTGPT2Settings
from modules.captioning import CaptioningModule
from modules.checkpoint import TOKENIZER_KEY, read_checkpoint_info

# Non-default options, so a translation that loses them builds other parameter shapes and the load fails.
OLD_SETTINGS: dict[str, dict[str, Any]] = {
    "vit_gpt2": {"preset": "tiny", "overrides": {"decoder": {"n_layer": 1}}},
    "show_attend_tell": {"preset": "tiny", "overrides": {"decoder": {"hidden_dim": 48}}},
}
NEW_SETTINGS: dict[str, CaptionerSettings] = {
    "vit_gpt2": ViTGPT2Settings(overrides={"decoder": {"n_layer": 1}}),
    "show_attend_tell": ShowAttendTellSettings(overrides={"decoder": {"hidden_dim": 48}}),
}
# What robucap fit (LightningCLI) adds to the hyper-parameters; a bare Trainer writes none of it.
CLI_KEYS = {
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
    "_class_path": f"{CaptioningModule.__module__}.CaptioningModule",
}


def _old_hyper_parameters(arch: str, **changes: Any) -> dict[str, Any]:
    """Every argument of the old ``CaptioningModule.__init__``, as its ``save_hyperparameters()`` recorded them."""
    saved: dict[str, Any] = {
        "arch": arch,
        "preset": "tiny",
        "image_size": 32,
        "pretrained_dir": None,
        "encoder_dir": None,
        "decoder_dir": None,
        "overrides": None,
        "encoder_weights": None,
        "lr": 0.002,
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
        "warmup_steps": 100,
        "schedule": "cosine",
        "min_lr_ratio": 0.05,
        "max_new_tokens": 12,
        "num_beams": 1,
        "num_samples": 8,
    }
    return {**saved, **OLD_SETTINGS[arch], **changes}


def _datamodule(root: Path) -> CaptionDataModule:
    return CaptionDataModule(format="coco", root=str(root), image_size=32, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def datamodule(shapes_root: Path) -> CaptionDataModule:
    datamodule = _datamodule(shapes_root)
    datamodule.setup("fit")
    return datamodule


def _write_old_checkpoint(path: Path, module: CaptioningModule, hyper_parameters: dict[str, Any]) -> Path:
    """The file ``trainer.save_checkpoint`` wrote for the old module: its weights, tokenizer and flat settings."""
    checkpoint = {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": hyper_parameters,
        TOKENIZER_KEY: tokenizer_to_state(module.tokenizer),
    }
    torch.save(checkpoint, path)
    return path


def _trained_as_old(arch: str, datamodule: CaptionDataModule, path: Path, **changes: Any) -> CaptioningModule:
    """A module of the old checkpoint's architecture (seeded weights), saved to ``path`` in the old form."""
    torch.manual_seed(1)
    module = CaptioningModule.with_tokenizer(
        datamodule.tokenizer, captioner=NEW_SETTINGS[arch], image_size=32, max_new_tokens=12
    )
    _write_old_checkpoint(path, module, _old_hyper_parameters(arch, **changes))
    return module


@pytest.mark.parametrize("written_by", ["robucap fit", "a bare Trainer"])
@pytest.mark.parametrize("arch", ["vit_gpt2", "show_attend_tell"])
def test_load_from_checkpoint_builds_the_old_checkpoints_captioner(
    arch: str, written_by: str, datamodule: CaptionDataModule, tmp_path: Path
) -> None:
    """``load_from_checkpoint`` on an old file built the default ViT-GPT2 (a state-dict mismatch for both)."""
    extra = CLI_KEYS if written_by == "robucap fit" else {}
    original = _trained_as_old(arch, datamodule, tmp_path / "old.ckpt", **extra)

    loaded = CaptioningModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=True)
    assert loaded.architecture == arch
    assert loaded.captioner_settings == NEW_SETTINGS[arch]
    assert loaded.hparams.captioner == NEW_SETTINGS[arch].to_dict()  # what a checkpoint it writes will hold
    assert loaded.hparams.max_new_tokens == 12 and loaded.hparams.lr == 0.002
    reference = original.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference[name]), name
    images = next(iter(datamodule.val_dataloader()))["pixel_values"][:6]
    original.eval()
    assert loaded.eval().caption(images) == original.caption(images)

    info = read_checkpoint_info(tmp_path / "old.ckpt")
    assert info.model["captioner"] == NEW_SETTINGS[arch].to_dict()
    assert not {"arch", "preset", "overrides"} & info.model.keys()


@pytest.mark.parametrize("arch", ["vit_gpt2", "show_attend_tell"])
def test_validate_ckpt_path_scores_the_old_checkpoints_captioner(
    arch: str, datamodule: CaptionDataModule, shapes_root: Path, tmp_path: Path
) -> None:
    """``robucap validate --ckpt_path`` on an old file built the default ViT-GPT2 and failed to load the weights."""
    original = _trained_as_old(arch, datamodule, tmp_path / "old.ckpt", **CLI_KEYS)
    reference_data = _datamodule(shapes_root)
    reference_data.use_tokenizer(original.tokenizer, "the test's module")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = trainer.validate(original, datamodule=reference_data, verbose=False)[0]

    cli = run_lightning_cli(
        ["validate", "--data.format", "coco", "--data.root", str(shapes_root), "--data.batch_size", "32",
         "--data.progress", "false", "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger",
         "false", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(tmp_path / "old.ckpt")]
    )  # fmt: skip
    assert cli.model.architecture == arch and cli.model.captioner_settings == NEW_SETTINGS[arch]
    assert cli.model.hparams.max_new_tokens == 12  # the checkpoint's other settings still apply
    got = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)
    assert got["val/bleu4"] == pytest.approx(expected["val/bleu4"], abs=1e-9)


def _validate_error(checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["--data.format", "coco", "--data.root", str(shapes_root), "--data.progress", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false"]  # fmt: skip
    assert main(["validate", *args, "--ckpt_path", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("hyper_parameters", "expected"),
    [
        (
            {"image_size": 32, "lr": 0.002},
            "records no captioner (neither model.captioner nor the older model.arch among its hyper_parameters)",
        ),
        ({"arch": "resnet_lstm", "preset": "tiny"}, "records model.arch 'resnet_lstm'; expected one of"),
        (
            {"arch": "show_attend_tell", "preset": "tiny", "pretrained_dir": "/models/vit-gpt2"},
            "records model.pretrained_dir, which show_attend_tell does not take",
        ),
    ],
)
def test_a_checkpoint_that_names_no_known_captioner_is_one_line(
    hyper_parameters: dict[str, Any],
    expected: str,
    datamodule: CaptionDataModule,
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Neither today's ``captioner`` nor a known old ``arch``: the default captioner was built silently."""
    torch.manual_seed(1)
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)
    path = _write_old_checkpoint(tmp_path / "odd.ckpt", module, hyper_parameters)
    assert _validate_error(path, shapes_root, tmp_path, capsys).startswith(
        f"robucap: error: checkpoint {path} {expected}"
    )
    with pytest.raises(RobucapError, match=f"^this checkpoint {re.escape(expected)}"):
        CaptioningModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def test_an_option_that_contradicts_an_old_checkpoints_captioner_is_one_line(
    datamodule: CaptionDataModule, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old checkpoint's captioner is compared with the command line's like today's: a Show-Attend-Tell
    checkpoint with ``--model.captioner vit_gpt2`` is refused before anything is built."""
    path = tmp_path / "old.ckpt"
    _trained_as_old("show_attend_tell", datamodule, path)
    args = ["--data.format", "coco", "--data.root", str(shapes_root), "--data.progress", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false"]  # fmt: skip
    assert main(["validate", *args, "--ckpt_path", str(path), "--model.captioner", "vit_gpt2"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"robucap: error: options contradict checkpoint {path}: model.captioner is ")
    assert "but the checkpoint's captioner has {'class_path': 'modules.captioners.show_attend_tell." in err


def test_a_module_built_as_another_architecture_refuses_an_old_checkpoint(
    datamodule: CaptionDataModule, tmp_path: Path
) -> None:
    """A module built by hand (a script's ``trainer.validate(module, ckpt_path=...)``) names both architectures
    instead of failing on a state-dict mismatch."""
    _trained_as_old("show_attend_tell", datamodule, tmp_path / "old.ckpt")
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)
    checkpoint = torch.load(tmp_path / "old.ckpt", map_location="cpu", weights_only=True)
    with pytest.raises(RobucapError, match="holds a show_attend_tell captioner, but the module was built as vit_gpt2"):
        module.on_load_checkpoint(checkpoint)
