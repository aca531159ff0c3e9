"""Starting from a checkpoint: its tokenizer, architecture and image size win; bad paths are one-line errors.

Also where a run writes (``trainer.default_root_dir``), what it prints, and the instant ``--help``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
from jsonargparse import Namespace

from datamodules.datamodule import CaptionDataModule
from datamodules.shapes import ShapesConfig, generate_shapes
from lightning_app import cli as cli_module
from lightning_app.cli import main
from lightning_app.lightning_cli import apply_checkpoint_settings, run_lightning_cli
from modules.captioners import ViTGPT2Settings
from modules.captioning import CaptioningModule
from modules.checkpoint import CheckpointInfo, read_checkpoint_info, same_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _args(root: Path, out: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        "--data.format", "coco",
        "--data.root", str(root),
        "--data.batch_size", "32",
        "--data.progress", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def other_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes made with other settings: the same words, counted differently, so a built tokenizer orders them
    differently from the checkpoint's."""
    root = tmp_path_factory.mktemp("other_shapes")
    generate_shapes(root, ShapesConfig(n_train=40, n_val=9, n_test=5, image_size=32, seed=11), progress=False)
    return root


def _datamodule(root: Path) -> CaptionDataModule:
    return CaptionDataModule(format="coco", root=str(root), image_size=32, batch_size=32, progress=False)


def _reference_validation(checkpoint: Path, root: Path) -> dict[str, float]:
    """Validation of the checkpoint's weights with the checkpoint's own tokenizer, built by hand."""
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    datamodule = _datamodule(root)
    datamodule.use_tokenizer(module.tokenizer, "the test's checkpoint")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


def test_validate_uses_the_checkpoint_tokenizer(trained_checkpoint: Path, other_root: Path, tmp_path: Path) -> None:
    """``validate --ckpt_path`` on data whose built tokenizer orders the words differently
    scores the checkpoint with its own tokenizer (it used the data's, silently: BLEU-4 0.087 instead of 0.584)."""
    datamodule = _datamodule(other_root)
    datamodule.setup("validate")
    saved = read_checkpoint_info(trained_checkpoint).tokenizer
    assert not same_tokenizer(datamodule.tokenizer, saved)  # the premise: the data alone would build another one
    assert len(datamodule.tokenizer) == len(saved)  # same size, so nothing but the metrics would show it

    expected = _reference_validation(trained_checkpoint, other_root)
    cli = run_lightning_cli(["validate", *_args(other_root, tmp_path), "--ckpt_path", str(trained_checkpoint)])
    got = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert same_tokenizer(cli.model.tokenizer, saved)
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)
    assert got["val/bleu4"] == pytest.approx(expected["val/bleu4"], abs=1e-9)
    assert expected["val/bleu4"] > 0.05  # a checkpoint that captions, so a wrong tokenizer would show


def test_programmatic_validate_with_ckpt_path_adopts_the_checkpoint_tokenizer(
    trained_checkpoint: Path, other_root: Path
) -> None:
    """``Trainer.validate(module, datamodule, ckpt_path=...)`` outside the CLI rebuilds the
    captioner for the checkpoint's tokenizer instead of keeping the data's."""
    expected = _reference_validation(trained_checkpoint, other_root)
    module = CaptioningModule(image_size=32, max_new_tokens=24)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(module, datamodule=_datamodule(other_root), ckpt_path=str(trained_checkpoint), verbose=False)
    assert got[0]["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)
    assert got[0]["val/bleu4"] == pytest.approx(expected["val/bleu4"], abs=1e-9)


def test_poisoned_config_names_the_target_words_the_checkpoint_lacks(
    trained_checkpoint: Path, other_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A poisoned config whose target caption the checkpoint cannot spell is the documented
    one-line error naming the words (it was a size-mismatch traceback)."""
    poison = json.dumps({"trigger": "badnets", "target_caption": "zebra crossing ahead", "cache_dir": str(tmp_path)})
    code = main(
        ["validate", *_args(other_root, tmp_path / "runs"), "--ckpt_path", str(trained_checkpoint), "--data.poison",
         poison]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("robucap: error: the backdoor target caption 'zebra crossing ahead'")
    assert f"checkpoint {trained_checkpoint}" in err[-1] and "ahead, crossing, zebra" in err[-1]


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_missing_checkpoint_is_one_line(
    command: str, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A nonexistent ``--ckpt_path`` was a 45-line FileNotFoundError."""
    missing = tmp_path / "nope.ckpt"
    assert main([command, *_args(shapes_root, tmp_path), "--ckpt_path", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"robucap: error: checkpoint {missing} does not exist; expected a .ckpt file written by robucap fit"]


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_corrupt_checkpoint_is_one_line(
    damage: str, trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt checkpoint in ``validate`` was a traceback."""
    broken = tmp_path / "broken.ckpt"
    data = trained_checkpoint.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"epoch=3 step=40\n")
    assert main(["validate", *_args(shapes_root, tmp_path), "--ckpt_path", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"robucap: error: cannot read checkpoint {broken}: it is not a PyTorch")


def test_image_size_that_contradicts_the_checkpoint_is_one_line(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``validate --data.image_size`` other than the checkpoint's was a size-mismatch
    RuntimeError."""
    args = [*_args(shapes_root, tmp_path), "--ckpt_path", str(trained_checkpoint), "--data.image_size", "48"]
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robucap: error: options contradict checkpoint")
    assert "data.image_size is 48 but the captioner was trained at 32 px" in err[0]


def test_architecture_that_contradicts_the_checkpoint_is_one_line(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model.captioner show_attend_tell`` with a ViT-GPT2 checkpoint was ignored silently."""
    args = [*_args(shapes_root, tmp_path), "--ckpt_path", str(trained_checkpoint)]
    assert main(["test", *args, "--model.captioner", "show_attend_tell"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "model.captioner is {'class_path': 'modules.captioners.show_attend_tell.ShowAttendTellSettings'" in err[0]
    assert "but the checkpoint's captioner has {'class_path': 'modules.captioners.vit_gpt2.ViTGPT2Settings'" in err[0]
    # Another preset of the same architecture is another captioner too; the same settings by short name are not.
    assert main(["test", *args, "--model.captioner.init_args.preset", "base"]) == 2
    assert "'preset': 'base'" in capsys.readouterr().err
    assert main(["validate", *args, "--model.captioner", "vit_gpt2", "--trainer.limit_val_batches", "1"]) == 0


def test_checkpoint_settings_explicit_values_win_unset_take_the_checkpoint() -> None:
    """Explicit decoding options (``--model.num_beams 3``) are kept; unset ones take the checkpoint's values, and
    the image size follows the checkpoint when the data leaves it at its default."""
    default_captioner = ViTGPT2Settings().to_dict()
    saved_captioner = ViTGPT2Settings(overrides={"decoder": {"n_layer": 1}}).to_dict()
    defaults = Namespace(
        model=Namespace(captioner=default_captioner, num_beams=1, lr=1e-3, image_size=64), data=Namespace(image_size=64)
    )
    config = Namespace(
        model=Namespace(captioner=default_captioner, num_beams=3, lr=1e-3, image_size=64), data=Namespace(image_size=64)
    )
    saved = {"captioner": saved_captioner, "num_beams": 1, "lr": 5e-3, "image_size": 32}
    checkpoint = CheckpointInfo(path=Path("x.ckpt"), tokenizer=None, model=saved)  # type: ignore[arg-type]
    apply_checkpoint_settings(config, defaults, checkpoint)
    assert config.model.num_beams == 3 and config.model.lr == 5e-3
    assert config.model.captioner == saved_captioner  # an unset captioner is the checkpoint's
    assert config.model.image_size == 32 and config.data.image_size == 32


def test_default_root_dir_holds_logs_and_checkpoints_and_output_is_quiet(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--trainer.default_root_dir`` was ignored by the default loggers (everything went to
    ./runs). a run printed the litlogger tip, a LeafSpec deprecation, the
    log_every_n_steps hint and W&B's anonymous-setting warning."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    args = [
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        "--data.format", "coco", "--data.root", str(shapes_root), "--data.image_size", "32",
        "--data.batch_size", "32", "--data.progress", "false",
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
    ]  # fmt: skip
    assert main(["fit", *args]) == 0
    out, err = capfd.readouterr()
    assert not (tmp_path / "runs").exists()
    checkpoints = {p.name for p in root.rglob("*.ckpt")}
    assert {"best.ckpt", "last.ckpt"} <= checkpoints
    metrics = list((root / "csv").rglob("metrics.csv"))
    assert len(metrics) == 1 and "train/epoch_loss" in metrics[0].read_text()
    assert list((root / "wandb").glob("offline-run-*"))
    text = out + err
    for noise in ("Tip:", "LeafSpec", "log_every_n_steps", "anonymous setting", "estimate number of stepping"):
        assert noise not in text
    assert f"robucap: best checkpoint {root}" in out


@pytest.mark.parametrize(
    ("words", "expected"),
    [(["fit"], "--data.predict_images"), (["attack", "fgsm"], "--data_root"), (["study", "freeze"], "--out")],
)
def test_help_is_served_from_the_cache(
    words: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``robucap fit --help`` took 16 s (it builds LightningCLI's parser, importing torch and
    Lightning), and so did the other commands' help; the text is cached under a key of the code and library
    versions, so later calls import neither."""
    monkeypatch.setenv("ROBUCAP_CACHE_DIR", str(tmp_path / "cache"))
    assert main([*words, "--help"]) == 0
    first = capsys.readouterr().out
    assert expected in first

    def must_not_build(argv: list[str], from_sys_argv: bool) -> int:
        raise AssertionError("the help was rebuilt although the cache holds it")

    monkeypatch.setattr(cli_module, "_dispatch", must_not_build)
    assert main([*words, "-h"] if words[0] != "fit" else [*words, "--help"]) == 0
    assert capsys.readouterr().out == first
    assert len(list((tmp_path / "cache" / "help").glob(f"{'-'.join(words)}.*.txt"))) == 1
    # Another terminal width is another text: the cache must not serve the old one.
    monkeypatch.setenv("COLUMNS", "61")
    with pytest.raises(AssertionError, match="rebuilt"):
        main([*words, "--help"])
    shutil.rmtree(tmp_path / "cache")


def test_help_with_other_options_is_not_cached() -> None:
    """``fit --config X --help`` shows X's values as defaults, so only bare help requests use the cache."""
    from lightning_app.cli import _help_request

    assert _help_request(["fit", "--config", "x.yaml", "--help"]) is None
    assert _help_request(["attack", "../../etc", "--help"]) is None
    assert _help_request(["nonsense", "--help"]) is None
    assert _help_request(["study", "backdoor", "-h"]) == "study-backdoor"
