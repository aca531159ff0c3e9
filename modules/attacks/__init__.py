"""Adversarial attacks, one file per method, all in [0, 1] pixel space, all called the same way.

The protocol (:mod:`modules.attacks.protocol`): an attack minimises an :class:`Objective` that the victim supplies
and returns an :class:`AttackResult`::

    result = attack(objective, pixel_values)
    result.adversarial  # (B, C, H, W) in [0, 1]
    result.success, result.iterations, result.linf, result.l2  # (B,) each; success None where undefined

The objective holds the victim and the batch's goal and says which way is "adversarial": an untargeted caption
objective is the negative cross-entropy of the reference caption, a targeted one the target's loss
(:mod:`modules.victims`). So FGSM, PGD and FG (budgeted), Liu et al. 2017's optimisation attack and Show-and-Fool
(Chen et al. 2018) run unchanged on a captioner, on an ensemble of captioners (Liu et al. 2017, eq. 6), or on any
other model that brings its own objective. Every attack works inside ``torch.inference_mode`` / ``no_grad``
(validation), never touches the parameters' ``.grad`` and leaves the model's train/eval mode as it found it.

:func:`build_attack` knows every attack by name: each attack file registers its class with
:func:`~modules.attacks.registry.register_attack`, and every file of this package is imported here, so adding an attack
is one file (:mod:`modules.attacks.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil

from modules.attacks.base import BudgetAttack, check_epsilon, check_step_size, project_linf, uniform_start
from modules.attacks.fg import FG
from modules.attacks.fgsm import FGSM
from modules.attacks.optimization import Optimization
from modules.attacks.pgd import PGD
from modules.attacks.protocol import Attack, AttackResult, Objective, eval_mode, input_gradient
from modules.attacks.registry import RegisteredAttack, build_attack, register_attack, registered_attacks
from modules.attacks.show_and_fool import ShowAndFool, ShowAndFoolResult

# Every file of the package, so that an attack added here registers without being listed anywhere.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

ATTACKS: tuple[str, ...] = tuple(registered_attacks())
"""The names of the attacks of this package (:func:`registered_attacks` also has those registered since)."""

ENSEMBLE_METHODS: tuple[str, ...] = ("optimization", "fg", "fgs")
"""Liu et al. 2017's three methods, as attack names (run on an ensemble objective)."""


__all__ = [
    "ATTACKS",
    "ENSEMBLE_METHODS",
    "FG",
    "FGSM",
    "PGD",
    "RegisteredAttack",
    "Attack",
    "AttackResult",
    "BudgetAttack",
    "Objective",
    "Optimization",
    "ShowAndFool",
    "ShowAndFoolResult",
    "build_attack",
    "check_epsilon",
    "check_step_size",
    "eval_mode",
    "input_gradient",
    "project_linf",
    "register_attack",
    "registered_attacks",
    "uniform_start",
]
