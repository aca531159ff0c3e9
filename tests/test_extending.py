"""Adding an attack or a study is one python file plus one YAML: each test adds a toy one and runs it end to end.

The toy attack lives in ``tests/helpers/toy_attack.py`` (config ``tests/fixtures/toy_attack.yaml``), the toy study in
``tests/helpers/toy_study.py`` (config ``tests/fixtures/toy_study.yaml``); no robucap file names either. Each fixture
imports its file into a copy of the registry and puts the original back afterwards, so other tests see the built-in
attacks and studies only.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import lightning_app.studies.base as study_base
import modules.attacks.registry as attack_registry
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.attack import attack_main, subcommands
from lightning_app.cli import main
from lightning_app.studies import available_studies, study_main
from modules.attacks import ATTACKS, BudgetAttack, build_attack, registered_attacks
from modules.captioning import CaptioningModule
from modules.evaluation import evaluation_loader
from modules.victims.captioner import CaptionObjective

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def _import_fresh(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``name`` anew, so that defining its classes registers them in the registries patched by the caller."""
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


@pytest.fixture
def toy_attack(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    assert "toy_momentum" not in registered_attacks()  # nothing registers it but importing its file
    monkeypatch.setattr(attack_registry, "_ATTACKS", dict(attack_registry._ATTACKS))
    yield _import_fresh("helpers.toy_attack", monkeypatch)
    sys.modules.pop("helpers.toy_attack", None)


@pytest.fixture
def toy_study(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    assert "toy" not in available_studies()
    monkeypatch.setattr(study_base, "_STUDIES", dict(study_base._STUDIES))
    yield _import_fresh("helpers.toy_study", monkeypatch)
    sys.modules.pop("helpers.toy_study", None)


def _first_test_batch(checkpoint: Path, root: Path, n: int) -> tuple[CaptioningModule, dict]:
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    datamodule = CaptionDataModule(format="coco", root=str(root), image_size=32, progress=False)
    datamodule.tokenizer = module.tokenizer
    return module, next(iter(evaluation_loader(module, datamodule.eval_dataset("test"), n, n)))


# ---------------------------------------------------------------------------------------------------------------------
# Attacks


def test_built_in_attacks_register_from_their_own_files() -> None:
    """The package's files register themselves: the names, the aliases and the options their names fix."""
    assert set(ATTACKS) == {"fgsm", "fgs", "fgsm_rs", "pgd", "fg", "optimization", "show_and_fool", "dag"}
    entries = registered_attacks()
    assert entries["fgs"].alias_of == "fgsm" and "fgs" not in registered_attacks(aliases=False)
    assert dict(entries["fgsm_rs"].fixed) == {"random_start": True}
    assert list(entries["pgd"].options) == ["use_eval_mode", "steps", "step_size", "random_start"]
    assert list(entries["fgsm"].options) == ["use_eval_mode"]  # plain FGSM: no random start, no step size
    # Budgeted and untargeted: a subcommand each; optimization and Show-and-Fool have no budget, aliases no entry;
    # DAG (no budget either) has a subcommand with its own settings.
    assert subcommands() == ("show-and-fool", "fg", "fgsm", "fgsm_rs", "pgd", "dag", "ensemble")


def test_a_name_taken_by_another_class_is_refused() -> None:
    with pytest.raises(ValueError, match="attack name 'pgd' is taken by modules.attacks.pgd.PGD"):

        @attack_registry.register_attack("PGD")
        class Other(BudgetAttack):
            def perturb(self, objective: object, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
                return pixel_values, 0

    with pytest.raises(ValueError, match=r"\['steps'\] are not parameters of FGSM"):
        attack_registry.register_attack("fgsm_steps", fixed={"steps": 3})(type(build_attack("fgsm", 0.1)))


def test_toy_attack_builds_and_runs_through_the_protocol(
    toy_attack: ModuleType, trained_checkpoint: Path, shapes_root: Path
) -> None:
    attack = build_attack("Toy-Momentum", 0.03, steps=4, decay=0.5)
    assert isinstance(attack, toy_attack.MomentumFGSM) and (attack.steps, attack.decay) == (4, 0.5)
    with pytest.raises(RobucapError, match="attack 'toy_momentum' has no option 'iterations'"):
        build_attack("toy_momentum", 0.03, iterations=3)
    with pytest.raises(RobucapError, match="attack 'toy_momentum' needs epsilon"):
        build_attack("toy_momentum")

    module, batch = _first_test_batch(trained_checkpoint, shapes_root, 4)
    x = batch["pixel_values"]
    objective = CaptionObjective(module.captioner, batch["labels"])
    result = attack(objective, x)
    assert result.adversarial.shape == x.shape and result.success is None  # untargeted: no success criterion
    assert result.iterations.tolist() == [4] * 4
    assert float((result.adversarial - x).abs().max()) <= 0.03 + 1e-6 and float(result.linf.min()) > 0
    # It attacks: the reference captions' cross-entropy rises on every image (the objective is its negative).
    with torch.no_grad():
        clean_loss, adversarial_loss = objective.loss(x), objective.loss(result.adversarial)
    assert bool((adversarial_loss < clean_loss).all()), (clean_loss, adversarial_loss)


def test_toy_attack_is_a_robucap_attack_subcommand(
    toy_attack: ModuleType, trained_checkpoint: Path, shapes_root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert "toy_momentum" in subcommands()
    assert attack_main(["--help"]) == 0
    assert "toy_momentum   momentum iterative FGSM (Dong et al. 2018)" in capsys.readouterr().out
    out = tmp_path / "toy"
    args = ["attack", "toy_momentum", "--config", str(FIXTURES / "toy_attack.yaml"), "--ckpt", str(trained_checkpoint),
            "--data_root", str(shapes_root), "--out", str(out), "--images", "4"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "attack toy_momentum"
    settings = results["settings"]
    # The YAML's options (the attack's own flat beside the common ones), the flag over the YAML's images.
    assert (settings["steps"], settings["decay"], settings["epsilon"], settings["images"]) == (3, 0.5, 0.03, 4)
    block = results["attack"]
    assert block["name"] == "toy_momentum" and (block["steps"], block["decay"]) == (3, 0.5)
    assert len(block["records"]) == 4 and 0 <= block["bleu4_adv"] <= 1
    assert (out / "report.html").is_file()
    # The attack's own options are flags; another attack's are not.
    assert main([*args, "--iterations", "3"]) == 2
    assert "attack toy_momentum: unrecognized arguments: --iterations 3" in capsys.readouterr().err


def test_without_its_file_the_toy_attack_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "toy_momentum", "--ckpt", "c", "--out", "o"]) == 2
    assert "unknown attack 'toy_momentum'" in capsys.readouterr().err
    with pytest.raises(RobucapError, match="unknown attack 'toy_momentum'"):
        build_attack("toy_momentum", 0.03)


# ---------------------------------------------------------------------------------------------------------------------
# Studies


def test_toy_study_runs_through_robucap_study(
    toy_study: ModuleType, trained_checkpoint: Path, shapes_root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert isinstance(available_studies()["toy"], toy_study.ToyStudy)
    assert study_main(["--help"]) == 0
    assert "  toy        Caption the first test images with a checkpoint" in capsys.readouterr().out
    out = tmp_path / "toy"
    args = ["study", "toy", "--config", str(FIXTURES / "toy_study.yaml"), "--out", str(out),
            "--study.ckpt", str(trained_checkpoint), "--data.root", str(shapes_root)]  # fmt: skip
    assert main(args) == 0
    assert "robucap study toy done" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["study"] == {"ckpt": str(trained_checkpoint), "images": 6, "batch_size": 3}
    assert results["settings"]["data"]["image_size"] == 32 and results["stages"]["toy"]["status"] == "ok"
    toy = results["toy"]
    assert toy["n"] == 6 and len(toy["records"]) == 6 and 0 < toy["bleu4"] <= 1  # the trained model is no guess
    assert "Clean captions of the test images" in (out / "report.html").read_text()


def test_toy_study_settings_are_checked_and_print(
    toy_study: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["study", "toy", "--config", str(FIXTURES / "toy_study.yaml"), "--out", str(tmp_path / "o"),
            "--data.root", "d", "--study.ckpt", "c.ckpt"]  # fmt: skip
    assert main([*base, "--study.images", "0"]) == 2
    assert "toy study images must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--study.epsilon", "0.1"]) == 2
    assert "study toy: unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--print_config"])
    printed = capsys.readouterr().out
    assert "ckpt: c.ckpt" in printed and "images: 6" in printed


def test_without_its_file_the_toy_study_is_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "toy", "--out", "o"]) == 2
    assert "unknown study 'toy'" in capsys.readouterr().err
