"""Attacks by name: each attack file registers its class with :func:`register_attack`; :func:`build_attack` builds one.

Adding an attack is one file with an :class:`~modules.attacks.protocol.Attack` subclass under the decorator::

    @register_attack("fgsm_rs", fixed={"random_start": True}, summary="FGSM from a random start (Wong et al. 2020)")
    class FGSM(BudgetAttack): ...

Files of this package are imported by ``modules/attacks/__init__.py``; a file elsewhere registers when it is imported.
A registered :class:`~modules.attacks.base.BudgetAttack` is also a ``robucap attack <name>`` subcommand whose flags
are its constructor's options (:attr:`RegisteredAttack.options`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from datamodules.errors import RobucapError
from modules.attacks.base import BudgetAttack
from modules.attacks.protocol import Attack

__all__ = ["RegisteredAttack", "attack_key", "build_attack", "register_attack", "registered_attacks"]

AttackT = TypeVar("AttackT", bound=type[Attack])

# Name -> entry, filled as attack files are imported (aliases included).
_ATTACKS: dict[str, RegisteredAttack] = {}


@dataclass(frozen=True)
class RegisteredAttack:
    """One name :func:`build_attack` accepts.

    Attributes:
        name: The name (lower case, ``_`` for ``-``).
        cls: The attack class.
        fixed: Constructor options the name sets (``fgsm_rs``: ``random_start=True``); callers cannot change them.
        summary: One line for ``robucap attack --help``.
        alias_of: The name this one repeats (``fgs`` for ``fgsm``); aliases are not offered as subcommands.
    """

    name: str
    cls: type[Attack]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    alias_of: str | None = None

    @property
    def budgeted(self) -> bool:
        """Whether the attack takes a perturbation budget ``epsilon`` (a :class:`BudgetAttack`)."""
        return issubclass(self.cls, BudgetAttack)

    @property
    def options(self) -> dict[str, inspect.Parameter]:
        """The constructor options a caller may set: every parameter but ``epsilon`` and the fixed ones."""
        parameters = inspect.signature(self.cls.__init__).parameters
        return {n: p for n, p in parameters.items() if n not in ("self", "epsilon", *self.fixed)}

    def build(self, epsilon: float | None = None, **options: Any) -> Attack:
        """The attack with these options.

        Raises:
            RobucapError: A budget missing or given to an attack without one, an unknown option, or a bad value.
        """
        if self.budgeted and epsilon is None:
            raise RobucapError(f"attack {self.name!r} needs epsilon (its budget in [0, 1] pixel units)")
        if not self.budgeted and epsilon is not None:
            raise RobucapError(
                f"attack {self.name!r} has no budget (epsilon); its distortion is set by its other options"
            )
        accepted = self.options
        for option in options:
            if option not in accepted:
                raise RobucapError(f"attack {self.name!r} has no option {option!r}; its options are {list(accepted)}")
        if self.budgeted:
            return self.cls(epsilon, **self.fixed, **options)  # type: ignore[call-arg]
        return self.cls(**self.fixed, **options)


def attack_key(name: str) -> str:
    """The registry's spelling of an attack name: case and ``-`` are ignored (``FGSM-RS`` is ``fgsm_rs``)."""
    return str(name).strip().lower().replace("-", "_")


def register_attack(
    name: str, *, aliases: tuple[str, ...] = (), fixed: Mapping[str, Any] | None = None, summary: str | None = None
) -> Callable[[AttackT], AttackT]:
    """Class decorator: make the attack known to :func:`build_attack` as ``name`` (and each of ``aliases``).

    Stack it to register one class under several names with different fixed options.

    Args:
        name: The attack's name.
        aliases: Other names for the same class and fixed options (not offered as ``robucap attack`` subcommands).
        fixed: Constructor options this name sets.
        summary: One line of help; default: the first line of the class docstring.

    Raises:
        ValueError: The name is already taken by another class, or ``fixed`` names no constructor parameter (mistakes
            in the attack's file, not in a user's input).
    """

    def register(cls: AttackT) -> AttackT:
        line = summary or (inspect.getdoc(cls) or cls.__name__).splitlines()[0].rstrip(".")
        options = MappingProxyType(dict(fixed or {}))
        unknown = set(options) - set(inspect.signature(cls.__init__).parameters)
        if unknown:
            raise ValueError(f"register_attack({name!r}): {sorted(unknown)} are not parameters of {cls.__name__}")
        key = attack_key(name)
        for alias in (key, *map(attack_key, aliases)):
            taken = _ATTACKS.get(alias)
            # Re-importing a file (a reloaded module) registers the same class again: that is no clash.
            if taken is not None and f"{taken.cls.__module__}.{taken.cls.__qualname__}" != _path(cls):
                raise ValueError(f"attack name {alias!r} is taken by {_path(taken.cls)}; {_path(cls)} needs another")
            _ATTACKS[alias] = RegisteredAttack(alias, cls, options, line, None if alias == key else key)
        return cls

    return register


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_attacks(aliases: bool = True) -> dict[str, RegisteredAttack]:
    """Every attack registered so far, by name, in registration order (the built-ins always are).

    Args:
        aliases: Include the aliases (``fgs``).
    """
    return {name: entry for name, entry in _ATTACKS.items() if aliases or entry.alias_of is None}


def build_attack(name: str, epsilon: float | None = None, **options: Any) -> Attack:
    """Build a registered attack by name.

    Args:
        name: A registered name (:func:`registered_attacks`): ``fgsm``, ``fgsm_rs`` (FGSM with random start, Wong et
            al. 2020), ``fgs`` (FGSM, as Liu et al. 2017 call it), ``pgd``, ``fg`` (L2 fast gradient; ``epsilon`` is
            then an L2 budget), ``optimization`` (Liu et al. 2017), ``show_and_fool`` (Chen et al. 2018), and any
            attack registered by a file imported since; case and ``-`` are ignored.
        epsilon: Budget in [0, 1] pixel units of the budgeted attacks (fgsm, fgsm_rs, fgs, pgd, fg); the others have
            none.
        **options: Options of the attack class (``use_eval_mode``, ``steps``, ``step_size``, ``iterations``, ...).

    Raises:
        RobucapError: Unknown name, unknown option, a budget missing or given to an attack without one, or an
            invalid value.
    """
    entry = _ATTACKS.get(attack_key(name))
    if entry is None:
        raise RobucapError(f"unknown attack {name!r}; expected one of {list(_ATTACKS)}")
    return entry.build(epsilon, **options)
