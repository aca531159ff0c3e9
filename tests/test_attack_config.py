"""`robucap attack` settings: jsonargparse configs, --print_config round trips, flag overrides and the shipped YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_app.attack import subcommands
from lightning_app.attack.parser import legacy_argv, parse_settings
from lightning_app.attack.settings import GradientSettings, ShowAndFoolSettings, settings_block, settings_type
from lightning_app.cli import main

REPO = Path(__file__).resolve().parents[1]

# Tiny runs: two images, one or two iterations; every subcommand's own options appear at least once.
OPTIONS: dict[str, list[str]] = {
    "show-and-fool": ["--iterations", "2", "--rounds", "1", "--target", "a small red cross", "--meteor", "false"],
    "fgsm": ["--epsilon", "0.02"],
    "fgsm_rs": ["--epsilon", "0.03", "--seed", "4", "--step_size", "0.04"],
    "pgd": ["--epsilon", "0.03", "--steps", "2", "--step_size", "0.01", "--random_start", "false"],
    "fg": ["--epsilon", "0.5"],
    "dag": ["--victim", "captioner", "--gamma", "0.01", "--max_iterations", "2", "--shrink_only", "true"],
    "ensemble": ["--method", "fgs", "--epsilon", "0.02", "--held_out", "1"],
}


def _ckpt(subcommand: str, checkpoint: Path) -> list[str]:
    return ["--ckpt", str(checkpoint), str(checkpoint)] if subcommand == "ensemble" else ["--ckpt", str(checkpoint)]


def test_every_subcommand_has_a_round_trip_case() -> None:
    assert set(OPTIONS) == set(subcommands())


@pytest.mark.parametrize("subcommand", sorted(OPTIONS))
def test_print_config_round_trip(
    subcommand: str, trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flags -> results.json settings; the same flags with --print_config -> YAML; that YAML with --config (and
    another --out) -> the same settings block."""
    common = [*_ckpt(subcommand, trained_checkpoint), "--data_root", str(shapes_root), "--images", "2",
              "--batch_size", "2", "--examples", "1", *OPTIONS[subcommand]]  # fmt: skip
    assert main(["attack", subcommand, *common, "--out", str(tmp_path / "flags")]) == 0
    capsys.readouterr()
    assert main(["attack", subcommand, *common, "--out", str(tmp_path / "flags"), "--print_config"]) == 0
    config = tmp_path / "printed.yaml"
    config.write_text(capsys.readouterr().out, encoding="utf-8")
    assert main(["attack", subcommand, "--config", str(config), "--out", str(tmp_path / "config")]) == 0
    flags = json.loads((tmp_path / "flags" / "results.json").read_text())
    from_config = json.loads((tmp_path / "config" / "results.json").read_text())
    assert from_config["settings"] == flags["settings"]
    assert flags["settings"]["images"] == 2 and "out" not in flags["settings"]
    assert not (tmp_path / "printed").exists()  # --print_config runs nothing


def test_flags_override_a_config(tmp_path: Path) -> None:
    config = tmp_path / "pgd.yaml"
    config.write_text("epsilon: 0.1\nsteps: 3\nimages: 7\n", encoding="utf-8")
    settings = parse_settings("pgd", ["--config", str(config), "--steps", "5", "--ckpt", "c.ckpt", "--out", "o"])
    assert isinstance(settings, GradientSettings)
    assert (settings.epsilon, settings.images, settings.ckpt) == (0.1, 7, "c.ckpt")
    # PGD's own options come from its signature: the flag over the file, the signature's defaults for the rest.
    assert settings.options == {"steps": 5, "step_size": None, "random_start": True, "use_eval_mode": True}


def test_budgeted_attack_options_are_flat_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """A budgeted attack's constructor options are flags of its subcommand, with the legacy bare boolean spelling;
    the settings block records them flat, as --print_config prints them."""
    settings = parse_settings("pgd", ["--ckpt", "c", "--out", "o", "--random-start", "--random_start=false"])
    assert isinstance(settings, GradientSettings) and settings.options["random_start"] is False
    assert parse_settings("fgsm_rs", ["--ckpt", "c", "--out", "o", "--step_size", "0.04"]).options == {
        "use_eval_mode": True, "step_size": 0.04}  # fmt: skip
    block = settings_block(settings)
    assert block["random_start"] is False and block["steps"] == 10 and "options" not in block and "out" not in block
    assert main(["attack", "pgd", "--ckpt", "c", "--out", "o", "--steps", "3", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 3 and "options" not in printed
    assert {k: v for k, v in printed.items() if k != "out"} == {**block, "steps": 3, "random_start": True}


def test_legacy_spellings() -> None:
    argv = [
        "--data-root",
        "d",
        "--no-meteor",
        "--batch-size",
        "3",
        "--keywords",
        "red,blue",
        "--ckpt",
        "c",
        "--out",
        "o",
    ]
    assert legacy_argv("show-and-fool", argv) == [
        "--data_root", "d", "--meteor=false", "--batch_size", "3", "--keywords", "red,blue", "--ckpt", "c",
        "--out", "o",
    ]  # fmt: skip
    assert legacy_argv("ensemble", ["--ckpt", "a b", "c", "--targeted", "--held-out", "1"]) == [
        '--ckpt=["a b", "c"]', "--targeted=true", "--held_out", "1"
    ]  # fmt: skip
    settings = parse_settings("show-and-fool", argv)
    assert isinstance(settings, ShowAndFoolSettings) and settings.meteor is False and settings.batch_size == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["fgsm", "--steps", "3", "--ckpt", "c", "--out", "o"],
            "attack fgsm: unrecognized arguments: --steps 3",
        ),
        (["pgd", "--ckpt", "c"], "attack pgd: the following arguments are required: out"),
        (["pgd", "--ckpt", "c", "--out", "o", "--steps", "many"], 'attack pgd: Parser key "steps": Expected a'),
        (
            ["show-and-fool", "--ckpt", "c", "--out", "o", "--loss", "l1"],
            'attack show-and-fool: Parser key "loss": Expected a',
        ),
        (
            ["ensemble", "--ckpt", "a", "b", "--out", "o", "--method", "pgd"],
            "--method must be one of optimization, fg, fgs",
        ),
        (["cw", "--ckpt", "c", "--out", "o"], "unknown attack 'cw'; expected one of show-and-fool, fg, fgsm"),
        # An attack without a budget, or an alias, is no subcommand.
        (["optimization", "--ckpt", "c", "--out", "o"], "unknown attack 'optimization'; expected one of"),
        (["fgs", "--ckpt", "c", "--out", "o"], "unknown attack 'fgs'; expected one of"),
        (["fgsm", "--ckpt", "c", "--out", "o", "--step_size", "0.1"], "attack fgsm: unrecognized arguments"),
    ],
)
def test_bad_options_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An option a subcommand does not have, a missing one or a wrong value: exit 2 and one line naming it."""
    assert main(["attack", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"robucap: error: {message}") and "\n" not in err


def _subcommand_of(path: Path) -> str:
    """The subcommand a shipped config is for: the longest subcommand name its file name starts with."""
    stem = path.stem.replace("_", "-")
    names = [s for s in subcommands() if stem == s.replace("_", "-") or stem.startswith(s.replace("_", "-") + "-")]
    assert names, f"{path.name} names no robucap attack subcommand"
    return max(names, key=len)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "attack").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    subcommand = _subcommand_of(path)
    settings = parse_settings(subcommand, ["--config", str(path), "--ckpt", "c.ckpt", "--out", "o"])
    assert isinstance(settings, settings_type(subcommand))


def test_every_subcommand_ships_a_config() -> None:
    shipped = {_subcommand_of(p) for p in (REPO / "configs" / "attack").glob("*.yaml")}
    assert shipped == set(subcommands())
