"""How a captioner is chosen and configured: a settings dataclass per captioner, injected into the LightningModule.

Each captioner file defines a frozen dataclass that subclasses :class:`CaptionerSettings`: its fields are the
captioner's options, and :meth:`CaptionerSettings.build` turns them, the tokenizer's ids and the image size into a
:class:`~modules.captioners.base.Captioner`. ``CaptioningModule`` takes one such object and knows nothing else about
the architecture. In YAML it is written the way jsonargparse writes any injected class::

    model:
      captioner:
        class_path: modules.captioners.vit_gpt2.ViTGPT2Settings
        init_args:
          preset: tiny

Checkpoints store the same ``{"class_path", "init_args"}`` form as plain data (:meth:`CaptionerSettings.to_dict`),
so they load with ``torch.load(weights_only=True)``, and :func:`resolve_captioner_settings` turns it back into the
object. ``class_path`` may also be a settings class's short :attr:`CaptionerSettings.name` (``vit_gpt2``).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from datamodules.errors import RobucapError
from datamodules.tokenizer import VocabInfo

if TYPE_CHECKING:
    from modules.captioners.base import Captioner

# Short name -> settings class, filled as captioner files are imported (see CaptionerSettings.__init_subclass__).
_REGISTRY: dict[str, type[CaptionerSettings]] = {}


class CaptionerSettings(ABC):
    """A captioner's options; subclasses are frozen dataclasses, one per captioner file.

    Attributes:
        name: Short name of the architecture (``vit_gpt2``), usable as ``class_path`` and shown in reports.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            _REGISTRY[name] = cls

    @abstractmethod
    def build(self, vocab: VocabInfo, image_size: int) -> Captioner:
        """Build the captioner.

        Args:
            vocab: Token ids of the tokenizer (from the data module or the checkpoint).
            image_size: Input side in pixels.

        Raises:
            RobucapError: Option values the architecture cannot build.
        """

    def to_dict(self) -> dict[str, Any]:
        """The jsonargparse form, ``{"class_path": ..., "init_args": {...}}``, as plain data."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dataclasses.asdict(self)}


def registered_captioners() -> dict[str, type[CaptionerSettings]]:
    """Settings classes by short name, for every captioner file imported so far (the built-ins always are)."""
    return dict(_REGISTRY)


def resolve_captioner_settings(spec: CaptionerSettings | Mapping[str, Any] | str) -> CaptionerSettings:
    """The settings object for a captioner given as an object, its ``{"class_path", "init_args"}`` form or a name.

    Args:
        spec: A :class:`CaptionerSettings`; a mapping with ``class_path`` (a dotted path of a settings class, or a
            registered short name) and optional ``init_args``; or a short name alone (default options).

    Returns:
        The settings object.

    Raises:
        RobucapError: No such class or name, a class that is not a ``CaptionerSettings`` dataclass, or ``init_args``
            that are not its fields.
    """
    if isinstance(spec, CaptionerSettings):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
        raise RobucapError(
            f"model.captioner must be {{class_path: <settings class or name>, init_args: {{...}}}}, got {spec!r}; "
            f"known captioners: {sorted(_REGISTRY)}"
        )
    extra = sorted(set(spec) - {"class_path", "init_args"})
    if extra:
        raise RobucapError(f"model.captioner accepts the keys class_path and init_args, got {extra}")
    cls = _settings_class(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    fields = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(init_args) - set(fields))
    if unknown:
        raise RobucapError(f"model.captioner.init_args {unknown} are not options of {cls.__name__}; expected {fields}")
    return cls(**init_args)


def _settings_class(class_path: str) -> type[CaptionerSettings]:
    """Look a settings class up by short name, else import it by its dotted path."""
    if class_path in _REGISTRY:
        return _REGISTRY[class_path]
    module_name, _, class_name = class_path.rpartition(".")
    expected = f"a registered name ({sorted(_REGISTRY)}) or the dotted path of a CaptionerSettings dataclass"
    if not module_name:
        raise RobucapError(f"model.captioner class_path {class_path!r} is not {expected}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the named module missing is a user's mistake; a missing import inside it is that module's bug.
        if not err.name or not (module_name + ".").startswith(err.name + "."):
            raise
        raise RobucapError(f"model.captioner class_path {class_path!r}: cannot import {module_name!r} ({err})") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, CaptionerSettings) and dataclasses.is_dataclass(cls)):
        raise RobucapError(f"model.captioner class_path {class_path!r} is not {expected}")
    return cls
