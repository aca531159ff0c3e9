"""Every shipped YAML parses and instantiates through the CLI (litgpt: every shipped config parsed by a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_app.lightning_cli import RobucapCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


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
    cli = RobucapCLI(args=args, run=False)
    assert cli.model.hparams.image_size == cli.datamodule.image_size  # the link data.image_size -> model.image_size
    assert cli.trainer is not None
