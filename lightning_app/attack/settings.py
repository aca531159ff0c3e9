"""Settings of every ``robucap attack`` subcommand: dataclasses parsed by jsonargparse (the docstrings are the help).

``robucap attack pgd --config configs/attack/pgd.yaml --epsilon 0.03``: a YAML file of these fields, then flags
that override it; ``--print_config`` prints the settings a command would run with. The ``settings`` block of
``results.json`` is :func:`settings_block`, so a printed config passed back with ``--config`` reproduces it.

Every registered budgeted attack (:func:`~modules.attacks.registry.registered_attacks`, aliases aside) is a
subcommand with :class:`GradientSettings`: the common fields plus the attack's own constructor options, flags derived
from its signature (``--steps``, ``--step_size`` for pgd), so a new attack needs no settings class here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from modules.attacks.registry import RegisteredAttack, registered_attacks

__all__ = [
    "DAG_VICTIMS",
    "AttackSettings",
    "DagSettings",
    "EnsembleSettings",
    "GradientSettings",
    "ShowAndFoolSettings",
    "gradient_attacks",
    "settings_block",
    "settings_type",
    "subcommands",
]


@dataclass(kw_only=True)
class AttackSettings:
    """What every attack subcommand reads: the data, the run and the output."""

    out: str
    """Output directory (results.json, report.html)."""
    data_config: str | None = None
    """A YAML file with a data: section, as for robucap fit (default: the checkpoint's own data settings)."""
    data_root: str | None = None
    """Dataset directory (default: the checkpoint's); overrides the data config's data.root."""
    format: str | None = None
    """Dataset format (default: the data config's, else the checkpoint's for its own root, else detected)."""
    image_size: int | None = None
    """Input size in px (default and only valid value: the checkpoint's)."""
    split: Literal["test", "val"] = "test"
    """Split to attack."""
    images: int = 50
    """Attack the first N images of the split."""
    batch_size: int = 32
    """Images attacked together."""
    seed: int = 0
    """Seed of targets and random starts."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1, ..."""
    examples: int = 4
    """Images in the report's example grids."""


@dataclass(kw_only=True)
class ShowAndFoolSettings(AttackSettings):
    """Show-and-Fool's (Chen et al. 2018) targeted caption and keyword attacks (Tables 1-3)."""

    ckpt: str
    """Checkpoint written by robucap fit."""
    modes: str | None = None
    """Comma-separated experiments: caption, keyword_1, keyword_2, keyword_3 (default: from target / keywords)."""
    iterations: int = 1000
    """Adam iterations per round (paper: 1000)."""
    rounds: int = 5
    """Rounds of the binary search on c (paper: 5)."""
    lr: float = 0.005
    """Adam learning rate (paper: 0.005)."""
    lr_growth: float = 3.0
    """Factor on an image's learning rate after each round it has not yet succeeded in (1: the paper's fixed rate)."""
    c: float = 1.0
    """Initial c (paper: 1)."""
    margin: float = 1.0
    """Confidence margin kappa (paper: 1)."""
    loss: Literal["logits", "log_prob"] = "logits"
    """Targeted-caption loss (keyword modes always use the logits loss)."""
    target: str | None = None
    """One fixed target caption for every image (caption mode)."""
    keywords: str | None = None
    """Fixed target keywords, comma-separated (mode keyword_M)."""
    meteor: bool = True
    """Compute METEOR in the failure statistics (false is faster)."""


@dataclass(kw_only=True)
class GradientSettings(AttackSettings):
    """An untargeted budgeted attack on the first reference caption (Rashid & Rivas 2024): fgsm, pgd, fg, ..."""

    ckpt: str
    """Checkpoint written by robucap fit."""
    epsilon: float = 0.05
    """Budget in [0, 1] pixel units (L-infinity; L2 for fg)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The attack's own constructor options (pgd: steps, step_size, ...); flat flags, not a ``--options`` flag."""


@dataclass(kw_only=True)
class EnsembleSettings(AttackSettings):
    """Liu et al.'s (2017) ensemble attack over several checkpoints, evaluated on all of them."""

    ckpt: list[str] = field(default_factory=list)
    """Two or more checkpoints written by robucap fit."""
    held_out: int | None = None
    """Index of the checkpoint left out of the ensemble, to play the black box."""
    method: str = "optimization"
    """Attack method: optimization (Adam in tanh space), fg (one L2-normalised step) or fgs (one signed step)."""
    targeted: bool = False
    """Targeted: every member should say the target (paper-style targets from the first member's captions unless target
    is given)."""
    target: str | None = None
    """With targeted: one fixed target caption for every image."""
    epsilon: float | None = None
    """Budget of fg (L2) and fgs (L-infinity) in [0, 1] pixel units; not used by optimization."""
    objective: Literal["mixture", "sum_loglik", "sum_margin"] | None = None
    """How the members combine: mixture (Liu et al.'s eq. 6, satisfied by the easiest member), sum_loglik (the
    members' target log-likelihood losses added up) or sum_margin (their Show-and-Fool margin losses, targeted only);
    default: sum_margin when targeted, mixture when not."""
    margin: float = 1.0
    """Confidence kappa of the sum_margin objective: a member whose target logits lead by kappa stops pulling."""
    iterations: int | None = None
    """Optimization iterations (default: the attack's)."""
    lr: float | None = None
    """Optimization learning rate (default: the attack's)."""
    distance_weight: float | None = None
    """Optimization lambda, the weight of the squared L2 distortion (default: the attack's, 0 as Liu et al.)."""


DAG_VICTIMS: tuple[str, ...] = ("captioner", "detector", "segmenter")
"""The victims ``robucap attack dag --victim`` names."""


@dataclass(kw_only=True)
class DagSettings(AttackSettings):
    """Dense Adversary Generation (Xie et al. 2017): every target of a dense victim pushed to another class."""

    ckpt: str
    """Checkpoint of the victim: robucap fit's captioner, detector or segmenter (as --victim says)."""
    victim: str = "captioner"
    """What the checkpoint holds: captioner (its caption's content words), detector (proposals), segmenter (pixels)."""
    gamma: float = 0.5 / 255
    """Step size, the L-infinity norm of every step, in [0, 1] pixel units (paper: 0.5 / 255)."""
    max_iterations: int | None = None
    """Most DAG steps per image (default: 150 detector, 200 segmenter, 200 captioner)."""
    shrink_only: bool = False
    """A target that left the active set never comes back (default: the paper's active set, recomputed each step)."""
    reselect_every: int = 0
    """Detector only: select the dense proposals again on the current image every N steps (0: the paper's fixed
    proposals of the clean image)."""
    margin: float = 0.0
    """Detector and segmenter, beyond the paper: a target stays active until its true class is this many logits below
    the best other class (0: the paper's rule, active while the true class is the top one)."""
    fgsm: bool = True
    """Also run FGSM at the L-infinity norm of DAG's mean perturbation, for comparison (captioner)."""


# The subcommands with their own settings and runner; every other one is a registered budgeted attack.
_OWN_SETTINGS: dict[str, type[AttackSettings]] = {
    "show-and-fool": ShowAndFoolSettings,
    "dag": DagSettings,
    "ensemble": EnsembleSettings,
}


def gradient_attacks() -> dict[str, RegisteredAttack]:
    """The registered attacks ``robucap attack <name>`` runs untargeted: the budgeted ones, aliases aside.

    Attacks without a budget (optimization, Show-and-Fool) have their own subcommands or run inside ``ensemble``.
    """
    return {name: entry for name, entry in registered_attacks(aliases=False).items() if entry.budgeted}


def subcommands() -> tuple[str, ...]:
    """Every ``robucap attack`` subcommand, attacks registered by files imported so far included.

    ``dag`` has no budget (its steps are normalised, not projected) but is a subcommand with its own settings.
    """
    return ("show-and-fool", *gradient_attacks(), "dag", "ensemble")


def settings_type(subcommand: str) -> type[AttackSettings]:
    """The settings dataclass of a subcommand (:class:`GradientSettings` for every budgeted attack).

    Raises:
        KeyError: Not a subcommand (the caller checks against :func:`subcommands`).
    """
    if subcommand in _OWN_SETTINGS:
        return _OWN_SETTINGS[subcommand]
    if subcommand in gradient_attacks():
        return GradientSettings
    raise KeyError(subcommand)


def settings_block(settings: AttackSettings) -> dict[str, Any]:
    """The settings recorded in ``results.json``: every field but the output directory, attack options flat.

    Flat as ``--print_config`` prints them, so the printed YAML and this block have the same keys.
    """
    block = {k: v for k, v in asdict(settings).items() if k != "out"}
    block.update(block.pop("options", {}))
    return block
