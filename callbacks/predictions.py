"""Write the captions of ``predict`` and ``test`` runs to ``predictions.jsonl`` in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.scratch import write_atomic
from modules.metrics import gather_unique

PREDICTIONS_FILE = "predictions.jsonl"
TEST_METRICS_FILE = "test_metrics.json"


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: ``<save_dir>/<name>/<version>`` of the first logger, as ``ModelCheckpoint`` uses.

    Without a logger, ``trainer.default_root_dir``.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


class PredictionsWriter(L.Callback):
    """``predictions.jsonl`` for ``robucap predict`` (image id, file, caption) and ``robucap test`` (plus references),
    and ``test_metrics.json`` next to the test predictions. Exact under DDP: rows are gathered and de-duplicated
    by image id (a distributed sampler pads the last batch with repeats), and rank 0 writes.

    Args:
        dirpath: Output directory; ``None`` uses the run directory (see :func:`run_dir`).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath
        self._rows: list[dict[str, Any]] = []
        self.last_path: Path | None = None

    def _out(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._rows.extend(outputs)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = gather_unique(self._rows)
        self._write(trainer, rows)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end runs after the module's on_test_epoch_end, which gathers and scores the predictions.
        results = getattr(pl_module, "test_results", None) or {}
        if not results.get("predictions"):
            return
        rows = [
            {
                "image_id": r["image_id"],
                "file": r.get("file"),
                "caption": r["prediction"],
                "references": r["references"],
            }
            for r in results["predictions"]
        ]
        path = self._write(trainer, rows)
        if trainer.is_global_zero:
            scores = {f"test/{k}": float(v) for k, v in results["scores"].items()}
            (path.parent / TEST_METRICS_FILE).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")

    def _write(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> Path:
        path = self._out(trainer) / PREDICTIONS_FILE
        if trainer.is_global_zero:
            write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
            print(f"robucap: captions of {len(rows)} images written to {path}")
        self.last_path = path
        return path
