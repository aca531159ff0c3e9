"""Every shipped YAML parses and instantiates through the CLI (litgpt: every shipped config parsed by a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_app.dense_cli import KINDS, VICTIM_CLASSES, DenseCLI, dense_victim
from lightning_app.lightning_cli import RobucapCLI
from modules.captioners import resolve_captioner_settings

ROOT = Path(__file__).resolve().parents[1] / "configs"
# configs/study and configs/demo hold the settings of `robucap study` and `robucap demo`, parsed by their own parsers.
COMMAND_CONFIGS = ("study", "demo", "attack")  # parsed by their own commands (test_attack_config, below)
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.relative_to(ROOT).parts[0] not in COMMAND_CONFIGS)
STUDY_CONFIGS = sorted((ROOT / "study").glob("*.yaml"))
DEMO_CONFIGS = sorted((ROOT / "demo").glob("*.yaml"))
# The captioner (architecture short name, preset) each model and experiment YAML must build. ViT-GPT2 tiny is also
# CaptioningModule's default, so those files are further checked to name their captioner themselves.
CAPTIONERS = {
    "model/show_attend_tell_resnet101.yaml": ("show_attend_tell", "standard"),
    "model/show_attend_tell_tiny.yaml": ("show_attend_tell", "tiny"),
    "model/vit_gpt2_base.yaml": ("vit_gpt2", "base"),
    "model/vit_gpt2_pretrained.yaml": ("vit_gpt2", "pretrained"),
    "model/vit_gpt2_tiny.yaml": ("vit_gpt2", "tiny"),
    "experiment/flickr8k_vit_gpt2.yaml": ("vit_gpt2", "pretrained"),
    "experiment/shapes_backdoor.yaml": ("show_attend_tell", "tiny"),
    "experiment/shapes_tiny.yaml": ("vit_gpt2", "tiny"),
}
# Configs of the dense victims and the pretraining modules, parsed by DenseCLI (lightning_app/dense_cli.py), and the
# kind each selects.
DENSE = {
    "defaults_detector.yaml": "detector",
    "defaults_segmenter.yaml": "segmenter",
    "defaults_encoder_pretraining.yaml": "encoder_pretraining",
    "defaults_decoder_pretraining.yaml": "decoder_pretraining",
    "experiment/shapes_detector.yaml": "detector",
    "experiment/shapes_segmenter.yaml": "segmenter",
    "experiment/shapes_pretrain_encoder.yaml": "encoder_pretraining",
    "experiment/shapes_pretrain_decoder.yaml": "decoder_pretraining",
}


def test_configs_exist() -> None:
    groups = {p.parent.name for p in CONFIGS}
    assert {"data", "model", "trainer", "logger", "experiment"} <= groups
    assert any("ddp" in p.name for p in CONFIGS if p.parent.name == "trainer")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # loggers create their save_dir relative to the working directory
    args = ["--config", str(config)]
    if "accelerator: gpu" in config.read_text():
        # No GPU here: parse everything the file says, then build the Trainer on CPU.
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    victim = dense_victim(["fit", *args])
    assert victim == DENSE.get(config.relative_to(ROOT).as_posix())
    cli = RobucapCLI(args=args, run=False) if victim is None else DenseCLI(victim, args=args, run=False)
    if victim is None or KINDS[victim].image_size_link:
        assert cli.model.hparams.image_size == cli.datamodule.image_size  # the link data.image_size -> model.image_size
    if victim is not None:
        assert VICTIM_CLASSES[f"{type(cli.model).__module__}.{type(cli.model).__qualname__}"] == victim
        return
    assert cli.trainer is not None
    expected = CAPTIONERS.get(config.relative_to(ROOT).as_posix())
    if expected is not None:
        settings = cli.model.captioner_settings
        assert (cli.model.architecture, settings.preset) == expected
        named = yaml.safe_load(config.read_text())["model"]["captioner"]
        assert settings == resolve_captioner_settings(named)  # every option the file gives, not a default


def test_every_model_and_experiment_config_says_which_captioner_it_builds() -> None:
    shipped = {p.relative_to(ROOT).as_posix() for p in CONFIGS if p.parent.name in ("model", "experiment")}
    assert shipped - set(DENSE) == set(CAPTIONERS)


@pytest.mark.parametrize("config", STUDY_CONFIGS, ids=lambda p: f"study/{p.name}")
def test_study_config_parses_and_instantiates(config: Path) -> None:
    from lightning_app.studies import load_study, study_parser

    study = load_study(config.stem.rsplit("_", 1)[0])
    parser = study_parser(study)
    objects = parser.instantiate(parser.parse_args(["--config", str(config), "--out", "o"]))
    assert isinstance(objects.study, study.settings_type)


@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: f"demo/{p.name}")
def test_demo_config_parses_and_instantiates(config: Path) -> None:
    from lightning_app.demo import demo_parser

    parser = demo_parser()
    objects = parser.instantiate(parser.parse_args(["--config", str(config)]))
    assert objects.name == config.stem and objects.baseline.epochs >= 1


def test_command_configs_exist() -> None:
    assert {p.stem for p in DEMO_CONFIGS} == {"quick", "full", "smoke"}
    assert {p.stem.rsplit("_", 1)[1] for p in STUDY_CONFIGS} == {"quick", "full", "smoke"}
