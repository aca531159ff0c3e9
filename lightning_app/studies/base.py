"""What every study is: typed settings, ``run``, ``report`` and ``summary`` (``robucap study NAME``).

Adding a study is one file defining a :class:`Study` subclass with a ``name`` (and a constructor without arguments):
defining the class registers it (:func:`registered_studies`). The files of :mod:`lightning_app.studies` are imported
by :func:`lightning_app.studies.available_studies`; a file elsewhere registers when it is imported. Its profiles are
``configs/study/<name>_<profile>.yaml``, or any YAML file given with ``--config``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from datamodules.errors import RobucapError
from lightning_app.inputs import shapes_root_for
from lightning_app.report import Report

__all__ = ["Study", "StudyData", "registered_studies"]

SettingsT = TypeVar("SettingsT")
OutcomeT = TypeVar("OutcomeT")

# Name -> study class, filled as study files are imported (see Study.__init_subclass__).
_STUDIES: dict[str, type[Study[Any, Any]]] = {}


def registered_studies() -> dict[str, type[Study[Any, Any]]]:
    """Every study class defined so far, by name (those of :mod:`lightning_app.studies` once it has imported them)."""
    return dict(_STUDIES)


@dataclass
class StudyData:
    """The data a study trains and evaluates on (``--data.*``)."""

    format: str = "shapes"
    """Dataset format: ``shapes`` (the built-in procedural data, created if missing) or a format of ``robucap fit``'s
    ``data.format`` (``coco``, ``karpathy``, ``flickr8k``, ``folder``)."""
    root: str | None = None
    """Dataset directory. ``null`` with shapes: ``data/shapes``, or ``data/shapes_<settings>`` for shapes made with
    other settings (the generator never rewrites a dataset made with other settings)."""
    image_size: int = 64
    """Side of the square images the captioners see, in pixels."""
    shapes: dict[str, int] = field(default_factory=dict)
    """Shapes generator settings that differ from its defaults (``n_train``, ``n_val``, ``n_test``...), used when
    the shapes data is created."""

    def __post_init__(self) -> None:
        if self.root is None and self.format != "shapes":
            raise RobucapError(f"--data.format {self.format} needs --data.root (the dataset directory)")

    def module_options(self, seed: int = 0) -> dict[str, Any]:
        """:class:`~datamodules.datamodule.CaptionDataModule` arguments of this data.

        Args:
            seed: Seed of the shapes data when it is generated (the default folder is named after it).
        """
        root = self.root or shapes_root_for(smoke=bool(self.shapes), seed=seed, image_size=self.image_size)
        return {
            "format": self.format,
            "root": root,
            "image_size": self.image_size,
            "shapes": {**self.shapes, "seed": seed},
        }


class Study(ABC, Generic[SettingsT, OutcomeT]):
    """One study: its settings type and the four steps ``robucap study NAME`` runs.

    ``run`` does the work and returns an outcome (the results plus whatever the report draws from, such as trained
    models); ``report`` adds sections to the HTML report; ``results`` is what goes into ``results.json`` (plain
    JSON, no live objects); ``summary`` is the line printed at the end.
    """

    name: ClassVar[str]
    """The subcommand word (``robucap study <name>``); profiles are ``configs/study/<name>_<profile>.yaml``."""
    help: ClassVar[str]
    """One line for ``robucap study --help``."""
    settings_type: ClassVar[type]
    """The settings dataclass (``--study.*``): a docstring under each field, checked in ``__post_init__``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names itself; one without a ``name`` (a shared base) does not register.

        Raises:
            ValueError: Another class already has the name (a mistake in the study's file, not in a user's input).
        """
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return
        taken = _STUDIES.get(name)
        # Re-importing a file (a reloaded module) defines the same class again: that is no clash.
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"study name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
        _STUDIES[name] = cls

    def data_seed(self, settings: SettingsT) -> int:
        """Seed of the shapes data this study generates (0: the shared default data)."""
        return 0

    @abstractmethod
    def run(self, settings: SettingsT, data: StudyData, out: Path) -> OutcomeT:
        """Train, attack and score; logs and checkpoints go under ``out``."""

    @abstractmethod
    def report(self, outcome: OutcomeT, report: Report) -> None:
        """Add the study's sections to ``report``."""

    @abstractmethod
    def results(self, outcome: OutcomeT) -> dict[str, Any]:
        """The entries of ``results.json`` (plain JSON)."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> str:
        """One line of headline figures from :meth:`results`."""
