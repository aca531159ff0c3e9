"""FreezeEncoder / FreezeDecoder: frozen before the optimizer exists, bitwise unchanged after a fit, counts logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from callbacks import AdversarialTraining, FreezeDecoder, FreezeEncoder
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from modules.captioners.vit_gpt2 import ViTGPT2Captioner
from modules.captioning import CaptioningModule


class RecordingLogger(Logger):
    """Keeps what is logged in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class Snapshot(L.Callback):
    """The captioner's weights at fit start, after freezing (a Trainer-built module has none before)."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.captioner.state_dict().items()}


@pytest.fixture(scope="module")
def datamodule(shapes_root: Path) -> CaptionDataModule:
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=8, progress=False)
    dm.setup("fit")
    return dm


def _trainer(callbacks: list[L.Callback], logger: Logger | bool = False) -> L.Trainer:
    return L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _part_names(module: CaptioningModule, part: str) -> set[str]:
    # Parameter names of a part, as keys of the captioner's state_dict.
    part_params = {id(p) for p in getattr(module.captioner, part).parameters()}
    return {name for name, p in module.captioner.named_parameters() if id(p) in part_params}


@pytest.mark.parametrize(
    ("freeze", "frozen", "trained", "built_by_trainer", "adversarial"),
    [
        # The CLI case: the captioner only exists after configure_model, which runs after Callback.setup.
        (FreezeEncoder, "encoder", "decoder", True, False),
        # Built up front (scripts, studies), and together with adversarial training (Rashid & Rivas 2024, phase 5).
        (FreezeDecoder, "decoder", "encoder", False, True),
    ],
)
def test_frozen_part_is_unchanged_and_not_optimized(
    datamodule: CaptionDataModule,
    freeze: type[L.Callback],
    frozen: str,
    trained: str,
    built_by_trainer: bool,
    adversarial: bool,
) -> None:
    L.seed_everything(0)
    if built_by_trainer:
        module = CaptioningModule(image_size=32, warmup_steps=0)
    else:
        module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32, warmup_steps=0)
    callback, snapshot, logger = freeze(), Snapshot(), RecordingLogger()
    callbacks = [callback, snapshot] + ([AdversarialTraining(mode="mixed", epsilon=0.05)] if adversarial else [])
    trainer = _trainer(callbacks, logger)
    trainer.fit(module, datamodule=datamodule)

    frozen_names, trained_names = _part_names(module, frozen), _part_names(module, trained)
    final = module.captioner.state_dict()
    assert frozen_names and trained_names
    assert all(torch.equal(final[name], snapshot.initial[name]) for name in frozen_names)
    assert any(not torch.equal(final[name], snapshot.initial[name]) for name in trained_names)

    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in getattr(module.captioner, frozen).parameters())
    assert all(id(p) in in_optimizer for p in getattr(module.captioner, trained).parameters())
    assert all(not p.requires_grad for p in getattr(module.captioner, frozen).parameters())
    assert "configure_model" not in vars(module)  # the deferred-freeze wrapper removed itself

    n_frozen = sum(p.numel() for p in getattr(module.captioner, frozen).parameters())
    n_total = sum(p.numel() for p in module.parameters())
    expected = {"train/trainable_params": n_total - n_frozen, "train/frozen_params": n_frozen}
    assert callback.param_counts == expected
    assert expected in logger.metrics
    if adversarial:
        assert trainer.callback_metrics["train/adv_epsilon"] == pytest.approx(0.05)


def test_freezing_both_parts_is_refused(datamodule: CaptionDataModule) -> None:
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)
    trainer = _trainer([FreezeEncoder(), FreezeDecoder()])
    with pytest.raises(RobucapError, match="FreezeEncoder and FreezeDecoder together would freeze the whole captioner"):
        trainer.fit(module, datamodule=datamodule)


class _NoEncoder(ViTGPT2Captioner):
    @property
    def encoder(self) -> nn.Module:
        return None  # type: ignore[return-value]


class _EncoderRaises(ViTGPT2Captioner):
    @property
    def encoder(self) -> nn.Module:
        raise NotImplementedError("this captioner has no separate vision part")


@pytest.mark.parametrize("captioner_class", [_NoEncoder, _EncoderRaises])
def test_missing_part_is_named(datamodule: CaptionDataModule, captioner_class: type) -> None:
    module = CaptioningModule.with_tokenizer(datamodule.tokenizer, image_size=32)
    module.captioner.__class__ = captioner_class
    with pytest.raises(RobucapError, match="FreezeEncoder: the captioner .* has no encoder"):
        _trainer([FreezeEncoder()]).fit(module, datamodule=datamodule)


def test_module_without_captioner_is_refused(datamodule: CaptionDataModule) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer.weight.sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(RobucapError, match="needs a LightningModule with a `captioner`"):
        _trainer([FreezeDecoder()]).fit(Plain(), datamodule=datamodule)
