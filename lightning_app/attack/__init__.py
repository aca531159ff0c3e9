"""``robucap attack``: attack a trained captioner on a dataset split and report it.

Subcommands (each writes ``OUT/results.json`` and ``OUT/report.html``; settings in
:mod:`lightning_app.attack.settings`, shipped profiles in ``configs/attack/``):

* ``show-and-fool``: Show-and-Fool's (Chen et al. 2018) targeted caption and keyword attacks (Tables 1-3);
* every registered budgeted attack (``fgsm``, ``fgsm_rs``, ``pgd``, ``fg``, and any attack registered by a file
  imported since, :mod:`modules.attacks.registry`): untargeted on the first reference caption (Rashid & Rivas
  2024): BLEU-4 clean and under attack, share of changed captions, RMSD (Liu et al. 2017, 0-255 scale);
* ``dag``: Dense Adversary Generation (Xie et al. 2017) on a captioner's content words (a detector's proposals and a
  segmenter's pixels once their runners exist), next to FGSM at the same L-infinity norm;
* ``ensemble``: Liu et al.'s (2017) ensemble attack, crafted on several checkpoints and evaluated on all of them.

Each subcommand parses its settings (:mod:`~lightning_app.attack.parser`), calls one evaluation in ``modules/``
and renders the report; no evaluation happens here.
"""

from __future__ import annotations

from datamodules.errors import RobucapError
from lightning_app.attack.settings import (
    DagSettings,
    EnsembleSettings,
    GradientSettings,
    ShowAndFoolSettings,
    gradient_attacks,
    subcommands,
)

__all__ = ["attack_main", "subcommands", "usage"]


def usage() -> str:
    """``robucap attack --help``: one line per subcommand, the registered budgeted attacks included."""
    lines = [
        "usage: robucap attack {" + ",".join(subcommands()) + "} [--config FILE] [options]",
        "",
        "Attack a trained captioner on a dataset split; write results.json and report.html.",
        f"  {'show-and-fool':<14} Show-and-Fool's targeted caption / keyword attacks (Chen et al. 2018, Tables 1-3)",
    ]
    lines += [f"  {name:<14} {entry.summary}, untargeted" for name, entry in gradient_attacks().items()]
    lines += [
        f"  {'dag':<14} Dense Adversary Generation on a captioner's words (Xie et al. 2017), next to FGSM",
        f"  {'ensemble':<14} Liu et al.'s (2017) ensemble attack over several checkpoints",
        "robucap attack SUBCOMMAND --help lists its options; --print_config prints the settings as YAML.",
    ]
    return "\n".join(lines)


def attack_main(argv: list[str]) -> int:
    """``robucap attack`` entry point.

    Returns:
        The exit status (0 on success, also after ``--help`` and ``--print_config``); bad input raises
        :class:`RobucapError` for the CLI to print.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    subcommand, rest = argv[0], argv[1:]
    if subcommand not in subcommands():
        raise RobucapError(f"unknown attack {subcommand!r}; expected one of {', '.join(subcommands())}")
    from lightning_app.attack.parser import parse_settings

    try:
        settings = parse_settings(subcommand, rest)
    except SystemExit as done:  # --help and --print_config print and stop, as LightningCLI's do
        return int(done.code or 0)
    if isinstance(settings, ShowAndFoolSettings):
        from lightning_app.attack.show_and_fool import run_show_and_fool_command

        return run_show_and_fool_command(settings)
    if isinstance(settings, DagSettings):
        from lightning_app.attack.dag import run_dag_command

        return run_dag_command(settings)
    if isinstance(settings, EnsembleSettings):
        from lightning_app.attack.ensemble import run_ensemble_command

        return run_ensemble_command(settings)
    if isinstance(settings, GradientSettings):
        from lightning_app.attack.gradient import run_gradient_attack

        return run_gradient_attack(subcommand, settings)
    raise TypeError(f"no runner for settings {type(settings).__name__}")  # a new settings type without a runner
