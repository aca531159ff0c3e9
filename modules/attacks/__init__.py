"""Adversarial attacks on captioners, one file per method, all in [0, 1] pixel space.

Every :class:`Attack` (FGSM, PGD, FG) is called as ``attack(captioner, pixel_values, labels) -> adversarial images``;
:class:`ShowAndFool` (targeted; Show-and-Fool, Chen et al. 2018) takes per-image target ids and
:class:`EnsembleAttack` (Liu et al. 2017) several captioners. All work inside ``torch.inference_mode`` /
``no_grad`` (validation), never touch the parameters' ``.grad``
and leave the model's train/eval mode as they found it.
"""

from __future__ import annotations

import inspect
from typing import Any

from datamodules.errors import RobucapError
from modules.attacks.base import (
    Attack,
    check_epsilon,
    check_step_size,
    eval_mode,
    input_gradient,
    project_linf,
    uniform_start,
)
from modules.attacks.ensemble import EnsembleAttack
from modules.attacks.fg import FG
from modules.attacks.fgsm import FGSM
from modules.attacks.pgd import PGD
from modules.attacks.show_and_fool import ShowAndFool, ShowAndFoolResult

# name -> (class, options the name fixes)
_REGISTRY: dict[str, tuple[type[Attack], dict[str, Any]]] = {
    "fgsm": (FGSM, {}),
    "fgsm_rs": (FGSM, {"random_start": True}),
    "pgd": (PGD, {}),
    "fg": (FG, {}),
}
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)


def build_attack(name: str, epsilon: float, **kwargs: Any) -> Attack:
    """Build an attack by name.

    Args:
        name: One of :data:`ATTACKS`: ``fgsm``, ``fgsm_rs`` (FGSM with random start, Wong et al. 2020), ``pgd``,
            ``fg`` (L2 fast gradient; ``epsilon`` is then an L2 budget).
        epsilon: Budget in [0, 1] pixel units.
        **kwargs: Options of the attack class (``targeted``, ``use_eval_mode``, ``steps``, ``step_size``, ...).

    Raises:
        RobucapError: Unknown name, unknown option, or an invalid value.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise RobucapError(f"unknown attack {name!r}; expected one of {list(ATTACKS)}")
    cls, fixed = _REGISTRY[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "epsilon")]
    for option in kwargs:
        if option not in accepted or option in fixed:
            allowed = [p for p in accepted if p not in fixed]
            raise RobucapError(f"attack {key!r} has no option {option!r}; its options are {allowed}")
    return cls(epsilon, **fixed, **kwargs)


__all__ = [
    "ATTACKS",
    "FG",
    "FGSM",
    "PGD",
    "Attack",
    "EnsembleAttack",
    "ShowAndFool",
    "ShowAndFoolResult",
    "build_attack",
    "check_epsilon",
    "check_step_size",
    "eval_mode",
    "input_gradient",
    "project_linf",
    "uniform_start",
]
