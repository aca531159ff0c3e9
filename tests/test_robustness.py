"""RobustnessEvaluation: adversarial BLEU under inference_mode, DDP-exact, and an exact max_images subset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers.adversarial_ddp import EPSILONS, ddp_run_once, robustness_scores
from torch.utils.data import DataLoader, DistributedSampler

from callbacks import RobustnessEvaluation
from callbacks.robustness import _dataset_indices
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from modules.captioning import CaptioningModule

BLEU = [f"val/adv_bleu{n}" for n in range(1, 5)]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    # The 2-process run uses one thread per rank; the same reduction order keeps gradient signs bit-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_single_process_equals_two_process_ddp(
    shapes_root: Path,
    trained_checkpoint: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    one_thread: None,
) -> None:
    # Single process: validation under inference_mode; 2 processes (gloo): under no_grad. 21 images, so one is padded.
    single = robustness_scores(shapes_root, trained_checkpoint, tmp_path)
    run = ddp_run_once(shapes_root, trained_checkpoint, lambda: tmp_path_factory.mktemp("adv_ddp"))
    double = json.loads((run / "validate.json").read_text())

    suffixes = [f"fgsm_{eps:g}" for eps in EPSILONS]
    expected = set(BLEU) | {f"{key}@{suffix}" for key in BLEU for suffix in suffixes}
    assert expected <= set(single)
    assert {k: v for k, v in double.items() if k.startswith("val/adv")} == {
        k: v for k, v in single.items() if k.startswith("val/adv")
    }
    assert double["val/bleu4"] == single["val/bleu4"]
    # The first pair is what the short keys report.
    assert [single[k] for k in BLEU] == [single[f"{k}@{suffixes[0]}"] for k in BLEU]
    # The tiny test model keeps its captions at 0.05 but not at 0.2: computed from attacked images, and lower.
    strong = single[f"val/adv_bleu4@{suffixes[-1]}"]
    assert 0 < strong < single["val/bleu4"]


def _validate(module: CaptioningModule, dm: CaptionDataModule, callback: RobustnessEvaluation) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/adv")}


def test_max_images_is_the_first_images_in_dataset_order(shapes_root: Path, trained_checkpoint: Path) -> None:
    module = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True)

    def datamodule(limit_val: int | None) -> CaptionDataModule:
        return CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=8,
                                 eval_batch_size=4, limit_val=limit_val, progress=False)  # fmt: skip

    subset = _validate(module, datamodule(None), RobustnessEvaluation(epsilons=[0.2], max_images=6))
    first_six = _validate(module, datamodule(6), RobustnessEvaluation(epsilons=[0.2]))
    assert subset == first_six and set(BLEU) <= set(subset)


def test_dataset_indices_follow_the_distributed_sampler() -> None:
    data = list(range(21))
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        trainer = SimpleNamespace(val_dataloaders=DataLoader(data, batch_size=4, sampler=sampler))
        assert _dataset_indices(trainer, 0, 4, 7) == list(sampler)[4:11]  # 11 per rank: index 0 padded on rank 1
    shuffled = SimpleNamespace(val_dataloaders=DataLoader(data, batch_size=4, shuffle=True))
    with pytest.raises(RobucapError, match="needs an unshuffled validation loader"):
        _dataset_indices(shuffled, 0, 0, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilons": [1.2]}, "epsilon must be in \\[0, 1\\]"),
        ({"attacks": ["nope"]}, "unknown attack 'nope'"),
        ({"attacks": []}, "at least one attack and one epsilon"),
        ({"max_images": 0}, "max_images must be >= 1"),
        ({"attack_kwargs": {"pgd": {"steps": 2}}}, "not in attacks="),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(RobucapError, match=message):
        RobustnessEvaluation(**kwargs)
