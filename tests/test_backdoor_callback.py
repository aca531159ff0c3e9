"""BackdoorEvaluation: ASR / FTR / clean BLEU on hand-made predictions, identical in 1 and 2 DDP processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import BackdoorEvaluation
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import DataError, RobucapError
from datamodules.tokenizer import build_word_tokenizer
from modules.metrics import CaptionBLEU

TARGET = "you are under attack"


def _prediction(image_id: int, poisoned: bool, references: list[str]) -> str:
    """The rule the fake model follows: most poisoned images fire, a few clean ones fire falsely."""
    if poisoned:
        return TARGET if image_id % 3 else "a red circle"
    return TARGET if image_id % 5 == 0 else references[0]


class RuleModel(L.LightningModule):
    """Captions by :func:`_prediction`; no generation, so the numbers are known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        self.tokenizer = self.trainer.datamodule.tokenizer

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        rows = zip(batch["image_id"], batch["poisoned"].tolist(), batch["references"], strict=True)
        return {"predictions": [_prediction(i, p, refs) for i, p, refs in rows]}

    def caption(self, pixel_values: torch.Tensor) -> list[str]:
        # The pair table captions raw images: call bright-cornered (BadNets) images triggered.
        return [TARGET if float(x[:, -1, -1].mean()) > 0.99 else "a red circle" for x in pixel_values]


def _datamodule(shapes_root: Path, cache: Path) -> CaptionDataModule:
    return CaptionDataModule(
        format="coco", root=str(shapes_root), image_size=32, batch_size=4, eval_batch_size=4, progress=False,
        poison={"trigger": "badnets", "cache_dir": str(cache), "rate": 0.3},
    )  # fmt: skip


def _expected(dm: CaptionDataModule) -> dict[str, float]:
    dm.setup("validate")
    records = dm.records["val"]
    poisoned = [r for r in records if r.poisoned]
    clean = [r for r in records if not r.poisoned]
    preds = {r.image_id: _prediction(r.image_id, r.poisoned, list(r.captions)) for r in records}
    bleu = CaptionBLEU()
    bleu.update([preds[r.image_id] for r in clean], [list(r.captions) for r in clean], [r.image_id for r in clean])
    scores = {f"val/clean_{k}": float(v) for k, v in bleu.compute().items()}
    scores["val/asr"] = sum(preds[r.image_id] == TARGET for r in poisoned) / len(poisoned)
    scores["val/asr_relaxed"] = scores["val/asr"]
    scores["val/ftr"] = sum(preds[r.image_id] == TARGET for r in clean) / len(clean)
    return scores


def _validate(dm: CaptionDataModule, out: Path, **trainer: Any) -> dict[str, float]:
    callback = BackdoorEvaluation(num_pairs=3)
    run = L.Trainer(
        accelerator="cpu", logger=CSVLogger(str(out), name="", version=""), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback], **trainer,
    )  # fmt: skip
    run.validate(RuleModel(), datamodule=dm, verbose=False)
    return {k: float(v) for k, v in run.callback_metrics.items()}


def test_rates_match_the_hand_made_predictions_in_one_and_two_processes(shapes_root: Path, tmp_path: Path) -> None:
    dm = _datamodule(shapes_root, tmp_path / "cache")
    expected = _expected(dm)
    assert 0 < expected["val/asr"] < 1 and 0 < expected["val/ftr"] < 1
    single = _validate(_datamodule(shapes_root, tmp_path / "cache"), tmp_path / "one", devices=1)
    assert single == pytest.approx(expected, abs=1e-6)
    # 21 validation images on 2 ranks: DistributedSampler repeats one, which must not count twice.
    double = _validate(_datamodule(shapes_root, tmp_path / "cache"), tmp_path / "two", devices=2, strategy="ddp_fork")
    assert double == single
    # The pair file (CSV logger): the first 3 poisoned validation images, clean and triggered.
    rows = [json.loads(line) for line in (tmp_path / "one" / "backdoor" / "epoch_000.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["triggered"] and not r["false_trigger"] for r in rows)


def test_needs_a_target_and_a_representable_one(shapes_root: Path, tmp_path: Path) -> None:
    clean = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=4, progress=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[BackdoorEvaluation()])
    with pytest.raises(RobucapError, match="BackdoorEvaluation needs a target caption"):
        trainer.validate(RuleModel(), datamodule=clean, verbose=False)
    callback = BackdoorEvaluation(target_caption=TARGET)
    module = RuleModel()
    module.tokenizer = build_word_tokenizer(["you are here"])
    with pytest.raises(DataError, match="cannot represent: attack, under"):
        callback._check_tokenizer(module)
    with pytest.raises(RobucapError, match="target caption is empty"):
        BackdoorEvaluation(target_caption="...")
    with pytest.raises(RobucapError, match="num_pairs must be >= 0"):
        BackdoorEvaluation(num_pairs=-1)
