"""Default loggers: Weights & Biases (offline without an API key) next to a CSV logger, both placed under
``trainer.default_root_dir`` when their ``save_dir`` is unset."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger


def wandb_offline_default() -> bool:
    """Offline unless an API key is configured, so `wandb sync` can upload the run later."""
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return True
    return not os.environ.get("WANDB_API_KEY")


class RobucapWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when no ``WANDB_API_KEY`` is set.

    Args:
        project: W&B project name.
        save_dir: Directory for the local run files (``<save_dir>/wandb/offline-run-*`` when offline); ``robucap``
            fills in ``trainer.default_root_dir`` when unset, and ``runs`` is the fallback elsewhere.
        name: Run name.
        offline: ``None`` decides from the environment (see :func:`wandb_offline_default`).
        log_model: Upload checkpoints as W&B artifacts (off by default: checkpoints stay on disk).
        **kwargs: Passed to ``WandbLogger`` / ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "robucap",
        save_dir: str | None = None,
        name: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        # Absolute, because wandb's long-lived service process resolves relative paths against its own cwd.
        save_dir = os.path.abspath(save_dir or "runs")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project,
            save_dir=save_dir,
            name=name,
            offline=wandb_offline_default() if offline is None else offline,
            log_model=log_model,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes the key; wandb warns that it is deprecated whenever it is present.
            self._wandb_init.pop("anonymous", None)


class RobucapCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``save_dir`` may be left unset, so ``robucap`` places it under
    ``trainer.default_root_dir`` (``runs`` outside the CLI).

    Args:
        save_dir: Directory of ``<name>/version_<n>/metrics.csv``.
        name: Experiment name (a sub-directory of ``save_dir``).
        **kwargs: Passed to ``CSVLogger``.
    """

    def __init__(self, save_dir: str | None = None, name: str = "csv", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir or "runs", name=name, **kwargs)
