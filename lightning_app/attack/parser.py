"""Parse ``robucap attack <subcommand> ...`` into its settings dataclass with jsonargparse, as LightningCLI does.

Flags are the settings' field names (``--batch_size``); the hyphenated spellings of earlier releases still work
(``--batch-size``, ``--data-root``, ``--no-meteor``, a bare ``--targeted``, ``--ckpt A B``): :func:`legacy_argv`
rewrites them before parsing. An option a subcommand does not have, or a value of the wrong type, is one line of
:class:`~datamodules.errors.RobucapError`.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields
from typing import Any

from jsonargparse import ArgumentParser, set_parsing_settings

from lightning_app.attack.settings import AttackSettings, GradientSettings, gradient_attacks, settings_type
from lightning_app.settings_parser import new_parser, parse

__all__ = ["build_parser", "legacy_argv", "parse_settings"]

_OPTION = re.compile(r"--([A-Za-z][A-Za-z0-9_-]*)(=.*)?", re.DOTALL)
# GradientSettings.options holds the attack's own flags; it is no flag itself.
_NOT_FLAGS = {"options"}


def build_parser(subcommand: str) -> ArgumentParser:
    """The parser of one subcommand: ``--config``, ``--print_config`` and one flag per settings field.

    A budgeted attack's subcommand also has one flag per option of its class's constructor (from its signature and
    its docstring's ``Args:``), flat beside the common ones: ``--steps`` rather than ``--attack.steps``.
    """
    # Field docstrings become the help text, as LightningCLI shows them for its classes.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    cls = settings_type(subcommand)
    if cls is not GradientSettings:
        parser = new_parser(f"robucap attack {subcommand}", (cls.__doc__ or "").strip())
        parser.add_class_arguments(cls, nested_key=None, as_group=False)
        return parser
    entry = gradient_attacks()[subcommand]
    parser = new_parser(f"robucap attack {subcommand}", f"{entry.summary}: {(cls.__doc__ or '').strip()}")
    parser.add_class_arguments(cls, nested_key=None, as_group=False, skip=_NOT_FLAGS)
    parser.add_method_arguments(entry.cls, "__init__", nested_key=None, as_group=False, skip={"epsilon", *entry.fixed})
    return parser


def _option_types(subcommand: str) -> dict[str, Any]:
    """The type of every flag of a subcommand: its settings' fields, and a budgeted attack's options."""
    cls = settings_type(subcommand)
    hints = typing.get_type_hints(cls)
    types = {f.name: hints[f.name] for f in fields(cls) if f.name not in _NOT_FLAGS}
    if cls is GradientSettings:
        entry = gradient_attacks()[subcommand]
        init_hints = typing.get_type_hints(entry.cls.__init__)
        types.update({name: init_hints.get(name) for name in entry.options})
    return types


def _kinds(subcommand: str) -> tuple[set[str], set[str]]:
    """The names of the boolean and of the list flags of ``subcommand``."""
    types = _option_types(subcommand)
    booleans = {name for name, kind in types.items() if kind is bool}
    lists = {name for name, kind in types.items() if typing.get_origin(kind) is list}
    return booleans, lists


def legacy_argv(subcommand: str, argv: list[str]) -> list[str]:
    """Rewrite the argparse-era spellings into jsonargparse's.

    ``--data-root`` -> ``--data_root``; ``--no-meteor`` -> ``--meteor=false``; a boolean flag without a value ->
    ``--flag=true``; ``--ckpt A B`` (a list field followed by several values) -> ``--ckpt=["A", "B"]``.
    """
    booleans, lists = _kinds(subcommand)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        match = _OPTION.fullmatch(token)
        if match is None:
            out.append(token)
            continue
        name, value = match.group(1).replace("-", "_"), match.group(2)
        if value is None and name.startswith("no_") and name[3:] in booleans:
            out.append(f"--{name[3:]}=false")
        elif value is None and name in booleans and (i == len(argv) or argv[i].startswith("--")):
            out.append(f"--{name}=true")
        elif value is None and name in lists:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            # One value may already be a list in jsonargparse's own syntax ("[a, b]").
            single = len(values) == 1 and values[0].lstrip().startswith("[")
            out.append(f"--{name}={values[0] if single else json.dumps(values)}")
        else:
            out.append(f"--{name}{value or ''}")
    return out


def parse_settings(subcommand: str, argv: list[str]) -> AttackSettings:
    """Parse one subcommand's arguments into its settings.

    ``--help`` and ``--print_config`` print and raise :class:`SystemExit` (status 0), as LightningCLI does.

    Raises:
        RobucapError: An unknown option, a missing required one, or a value of the wrong type.
    """
    namespace = parse(build_parser(subcommand), legacy_argv(subcommand, argv))
    values = namespace.as_dict()
    values.pop("config", None)
    cls = settings_type(subcommand)
    if cls is not GradientSettings:
        return cls(**values)
    own = {f.name for f in fields(cls)}
    options = {k: v for k, v in values.items() if k not in own}
    return cls(**{k: v for k, v in values.items() if k in own}, options=options)
