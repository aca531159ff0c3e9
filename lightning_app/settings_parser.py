"""Settings of the config-driven commands (``robucap study``, ``demo``, ``poison-scan``), parsed by jsonargparse.

As with ``robucap fit``: ``--config FILE`` reads a YAML file, ``--print_config`` prints the resolved settings (a file
that ``--config`` reads back), and dotted flags override one field (``--study.epsilon 0.1``, ``--data.root DIR``).
``--profile NAME`` is a shorthand for ``--config`` on a shipped YAML file (``configs/study/freeze_smoke.yaml``): it
is read first, so every other option overrides it. An option a command does not have, or a value of the wrong type,
is a :class:`~datamodules.errors.RobucapError` (one line, exit status 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from datamodules.errors import RobucapError

__all__ = ["CONFIGS_DIR", "expand_profile", "new_parser", "parse", "profiles", "settings_block"]

# Shipped next to the package (editable install), as configs/defaults.yaml is for LightningCLI.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def new_parser(prog: str, description: str) -> ArgumentParser:
    """A parser with ``--config`` and ``--print_config`` that raises instead of exiting on a bad option."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of settings (flags after it override)")
    return parser


def profiles(folder: Path, prefix: str) -> list[str]:
    """The names of the shipped profiles ``folder/<prefix><name>.yaml``."""
    return sorted(p.stem.removeprefix(prefix) for p in folder.glob(f"{prefix}*.yaml"))


def expand_profile(argv: list[str], folder: Path, prefix: str) -> list[str]:
    """``argv`` with ``--profile NAME`` replaced by ``--config folder/<prefix>NAME.yaml``, moved first.

    Moved first so that every other option, given before or after it, overrides the profile.

    Raises:
        RobucapError: ``--profile`` without a name, or a name with no shipped file.
    """
    rest, chosen = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--profile" or arg.startswith("--profile="):
            if "=" in arg:
                name = arg.split("=", 1)[1]
            elif index + 1 < len(argv):
                index += 1
                name = argv[index]
            else:
                raise RobucapError("--profile needs a name")
            path = folder / f"{prefix}{name}.yaml"
            if not path.is_file():
                raise RobucapError(f"unknown --profile {name!r}; expected one of {profiles(folder, prefix)}")
            chosen = ["--config", str(path)]
        else:
            rest.append(arg)
        index += 1
    return chosen + rest


def parse(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parse ``argv``; a bad option or value becomes one line naming it.

    Raises:
        RobucapError: jsonargparse refused the arguments (unknown option, wrong type, missing required option,
            unreadable config file).
    """
    try:
        return parser.parse_args(argv)
    except ArgumentError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise RobucapError(f"{parser.prog.removeprefix('robucap ')}: {message}") from error


def settings_block(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """The parsed settings as plain JSON: what ``--print_config`` prints, recorded as ``settings`` in results.json."""
    block = json.loads(parser.dump(config, format="json", skip_none=False, skip_validation=True))
    block.pop("config", None)
    return block
