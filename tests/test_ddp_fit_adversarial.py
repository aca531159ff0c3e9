"""Acceptance: a 2-process CPU DDP fit with AdversarialTraining + FreezeEncoder runs; both ranks end identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.adversarial_ddp import ddp_run_once


def test_ddp_fit_with_adversarial_training_and_frozen_encoder(
    shapes_root: Path, trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = ddp_run_once(shapes_root, trained_checkpoint, lambda: tmp_path_factory.mktemp("adv_ddp"))
    weights = {
        (stage, rank): torch.load(run / "fit" / f"{stage}_rank{rank}.pt", weights_only=True)
        for stage in ("initial", "final")
        for rank in (0, 1)
    }
    final0, final1, initial = weights["final", 0], weights["final", 1], weights["initial", 0]
    assert final0.keys() == final1.keys() == initial.keys()
    assert all(torch.equal(final0[k], final1[k]) for k in final0)  # DDP kept the replicas bitwise in sync
    encoder = [k for k in initial if k.startswith("model.encoder.")]
    decoder = [k for k in initial if k.startswith("model.decoder.")]
    assert encoder and decoder
    assert all(torch.equal(final0[k], initial[k]) for k in encoder)  # frozen: not even weight decay
    assert any(not torch.equal(final0[k], initial[k]) for k in decoder)
    # Rank 0 alone drew the adversarial examples of the validation run, without blocking rank 1.
    assert (run / "validate" / "adversarial_examples" / "epoch_000.png").is_file()
