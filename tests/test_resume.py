"""Checkpoints and resume: ``last.ckpt`` is the latest state, and a run resumed from it after ``kill -9`` in the middle
of an epoch ends with the same weights, bit for bit, as an uninterrupted run (CPU)."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from callbacks import AdversarialTraining, LatestCheckpoint, TrainingRNG
from datamodules.errors import RobucapError
from datamodules.sampler import ResumableDataLoader, ResumableSampler
from tests.helpers.ddp import run_ddp
from tests.helpers.resume_run import EVERY_N_STEPS, MAX_EPOCHS, STEPS_PER_EPOCH, start_script

REPO = Path(__file__).resolve().parents[1]


# -- the sampler and the loader -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 16, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_deals_like_distributed_sampler(n: int, world: int, drop_last: bool) -> None:
    """The order is DistributedSampler's (seed + epoch), so DDP shards are unchanged."""
    for epoch in (0, 3):
        for rank in range(world):
            reference = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
            sampler = ResumableSampler(range(n), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
            reference.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(reference)
            assert len(sampler) == len(reference)


def test_sampler_skip_continues_each_shard() -> None:
    """Skipping k batches of every rank leaves each rank's shard from its (k+1)-th item on."""
    world, batch = 2, 3
    full = {rank: list(ResumableSampler(range(25), num_replicas=world, rank=rank, seed=1)) for rank in range(world)}
    for rank in range(world):
        sampler = ResumableSampler(range(25), num_replicas=world, rank=rank, seed=1)
        sampler.skip_to(epoch=0, start=2 * batch * world)
        assert list(sampler) == full[rank][2 * batch :]
        assert list(sampler) == full[rank]  # the skip applies to one iteration only
        sampler.skip_to(epoch=4, start=6)
        assert list(sampler) == full[rank]  # ... and only to its epoch


def test_sampler_skip_with_another_world_size_deals_the_rest() -> None:
    """After a restart on another number of ranks, the rest of the epoch is dealt evenly and nothing of it is lost
    (padding to equal shards repeats a few items, as ``DistributedSampler`` does)."""
    order = list(ResumableSampler(range(20), num_replicas=1, seed=2))
    shards = []
    for rank in range(3):
        sampler = ResumableSampler(range(20), num_replicas=3, rank=rank, seed=2)
        sampler.skip_to(epoch=0, start=8)
        shards.append(list(sampler))
    dealt = [i for shard in shards for i in shard]
    assert len({len(shard) for shard in shards}) == 1
    assert set(order[8:]) <= set(dealt)
    assert len(dealt) - len(order[8:]) < 2 * 3


def _pairs(n: int = 40) -> TensorDataset:
    return TensorDataset(torch.arange(n))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_mid_epoch(num_workers: int) -> None:
    """A loader restored from a mid-epoch state yields the rest of that epoch, not a new one.

    With a worker process the sampler runs ahead of the training loop; the position counts batches handed out.
    """

    def loader() -> ResumableDataLoader:
        sampler = ResumableSampler(_pairs(), seed=3)
        sampler.set_epoch(2)
        return ResumableDataLoader(_pairs(), sampler=sampler, batch_size=4, num_workers=num_workers)

    first = loader()
    iterator = iter(first)
    seen = [next(iterator)[0] for _ in range(3)]
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (2, 3)
    rest = [batch[0] for batch in iterator]
    assert len(seen) + len(rest) == len(first) == 10

    resumed = loader()
    resumed.load_state_dict(state)
    resumed_batches = [batch[0] for batch in resumed]
    assert len(resumed_batches) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(resumed_batches, rest, strict=True))
    assert resumed.position.batches == 10


def test_loader_refuses_a_state_of_other_data() -> None:
    """A checkpoint of another training set cannot place this one's epoch."""
    state = ResumableDataLoader(_pairs(40), sampler=ResumableSampler(_pairs(40)), batch_size=4).state_dict()
    other = ResumableDataLoader(_pairs(30), sampler=ResumableSampler(_pairs(30)), batch_size=4)
    with pytest.raises(RobucapError, match="40 training pairs.*30"):
        other.load_state_dict(state)


# -- the training RNG stream --------------------------------------------------------------------------------------
class _Dropout(L.LightningModule):
    """A linear model behind dropout; validation draws random numbers too (as a validation iterator does)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.5)
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(24, 4, generator=generator)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(self.dropout(self.inputs[batch[0]])).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        torch.rand(7)
        np.random.rand(3)
        random.random()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = TensorDataset(torch.arange(24))
        return ResumableDataLoader(dataset, sampler=ResumableSampler(dataset, seed=0), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(4)), batch_size=2)


def _fit_dropout(root: Path, max_epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = _Dropout()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[TrainingRNG(), LatestCheckpoint(dirpath=str(root))],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_rng_survives_an_epoch_end_resume(tmp_path: Path) -> None:
    """Dropout after resuming from an epoch-end last.ckpt draws what it would have drawn.

    Between that checkpoint's last step and the next step the uninterrupted run validates and starts a new
    iterator, both drawing from the global generators; the resumed run does neither before its first step.
    """
    uninterrupted = _fit_dropout(tmp_path / "a", max_epochs=3)
    _fit_dropout(tmp_path / "b", max_epochs=1)
    resumed = _fit_dropout(tmp_path / "b", max_epochs=3, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_training_rng_moves_itself_first() -> None:
    """The stream must be in place before any other callback's on_train_batch_start."""
    rng = TrainingRNG()
    adversarial = AdversarialTraining(mode="mixed", attack="fgsm_rs", epsilon=0.05)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[adversarial, rng], enable_progress_bar=False)
    rng.setup(trainer, _Dropout(), "fit")
    assert trainer.callbacks.index(rng) == 0
    assert trainer.callbacks.index(adversarial) == 1


def _gather_worker(rank: int, world_size: int) -> tuple[int, bool, bool]:
    torch.manual_seed(100 + rank)
    np.random.seed(rank)
    random.seed(rank)
    rng = TrainingRNG()
    rng.on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]  # captures the stream
    expected = (torch.rand(3), np.random.rand(2), random.random())
    state = rng.state_dict()  # a collective: both ranks are here
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    restored = TrainingRNG()
    restored.load_state_dict(state)
    restored.on_train_batch_start(None, None, None, 0)  # type: ignore[arg-type]  # puts this rank's stream back
    again = (torch.rand(3), np.random.rand(2), random.random())
    same = torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    ranks_differ = not torch.equal(state["ranks"][0]["torch_cpu"], state["ranks"][1]["torch_cpu"])
    return len(state["ranks"]), same, ranks_differ


def test_training_rng_keeps_every_ranks_stream() -> None:
    """Under DDP the checkpoint holds each rank's stream and each rank gets its own back."""
    results = run_ddp(_gather_worker, 2)
    assert results == [(2, True, True), (2, True, True)]


# -- last.ckpt ------------------------------------------------------------------------------------------------------
def test_latest_checkpoint_rejects_bad_interval() -> None:
    with pytest.raises(RobucapError, match="every_n_train_steps must be >= 0"):
        LatestCheckpoint(every_n_train_steps=-1)
    with pytest.raises(RobucapError, match="must be an integer"):
        LatestCheckpoint(every_n_train_steps=2.5)  # type: ignore[arg-type]


def test_latest_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write killed half-way leaves the previous last.ckpt as it was; a finished one replaces it."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    callback = LatestCheckpoint(dirpath=str(tmp_path))
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"previous")

    def dies_while_writing(filepath: Path, weights_only: bool = False) -> None:
        Path(filepath).write_bytes(b"trunc")
        raise OSError("killed mid-write")

    monkeypatch.setattr(trainer, "save_checkpoint", dies_while_writing)
    with pytest.raises(OSError, match="killed mid-write"):
        callback._save_checkpoint(trainer, str(last))
    assert last.read_bytes() == b"previous"

    def writes(filepath: Path, weights_only: bool = False) -> None:
        Path(filepath).write_bytes(b"new")

    monkeypatch.setattr(trainer, "save_checkpoint", writes)
    callback._save_checkpoint(trainer, str(last))
    assert last.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_ckpt_is_the_final_epoch_cli(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With validation every 2 epochs, last.ckpt of a 3-epoch run is epoch 3, not epoch 2."""
    from lightning_app.cli import main

    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"),
        "--data.format", "coco", "--data.root", str(shapes_root), "--data.image_size", "32",
        "--data.batch_size", "16", "--data.limit_val", "4", "--data.progress", "false",
        "--model.max_new_tokens", "8",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
        "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2",
        "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    assert main(args) == 0
    checkpoints = tmp_path / "runs" / "checkpoints"
    last, best = _load(checkpoints / "last.ckpt"), _load(checkpoints / "best.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert (best["epoch"], best["global_step"]) == (1, 4)  # the only validation


def test_last_ckpt_is_the_final_epoch_train_captioner(shapes_root: Path, tmp_path: Path) -> None:
    """The programmatic path (demo, studies) keeps last.ckpt at the final epoch too."""
    from datamodules.datamodule import CaptionDataModule
    from lightning_app.training import train_captioner
    from modules.captioning import CaptioningModule

    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, batch_size=16, limit_val=4,
                           progress=False)  # fmt: skip
    dm.setup("fit")
    module = CaptioningModule.with_tokenizer(dm.tokenizer, image_size=32, max_new_tokens=8)
    trainer_kwargs = {"check_val_every_n_epoch": 2, "limit_train_batches": 2, "enable_progress_bar": False}
    result = train_captioner(dm, module, tmp_path, "run", max_epochs=3, wandb=False, test=False,
                             trainer_kwargs=trainer_kwargs)  # fmt: skip
    last = _load(tmp_path / "checkpoints" / "run" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert result.checkpoint.name == "best.ckpt"


# -- kill -9 in the middle of an epoch, then resume -----------------------------------------------------------------
# (scenario, kill during optimizer step, last step checkpoint before it): the plain run dies in epoch 2 and resumes
# through that epoch's end, its validation and epoch 3; the adversarial one dies in epoch 3, after a validation.
SCENARIOS = {"plain": (False, 14, 12), "adversarial": (True, 26, 24)}


def _finish(process: subprocess.Popen[str], what: str, timeout: float = 400) -> int:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{what} failed ({process.returncode}):\n{err[-4000:]}")
    return process.returncode


@pytest.fixture(scope="module")
def resume_runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """For each scenario: an uninterrupted run, and a run killed mid-epoch then resumed from its last.ckpt.

    The four first runs go in parallel, then the two resumes (process start-up is most of their time).
    """
    root = tmp_path_factory.mktemp("resume")
    started = {}
    for name, (adversarial, kill_at, _) in SCENARIOS.items():
        started[name, "full"] = start_script(shapes_root, root / name / "full", adversarial)
        started[name, "killed"] = start_script(shapes_root, root / name / "killed", adversarial, kill_at_step=kill_at)
    codes = {key: _finish(process, f"{key[0]} {key[1]} run") for key, process in started.items()}
    runs: dict[str, dict[str, Any]] = {}
    resumes = {}
    for name, (adversarial, _, _) in SCENARIOS.items():
        last = root / name / "killed" / "checkpoints" / "last.ckpt"
        runs[name] = {"exit": codes[name, "killed"], "killed_at": _load(last) if last.is_file() else None}
        resumes[name] = start_script(shapes_root, root / name / "killed", adversarial, ckpt_path=last)
    for name, process in resumes.items():
        runs[name]["resume_exit"] = _finish(process, f"{name} resume")
        runs[name]["full"] = _load(root / name / "full" / "checkpoints" / "last.ckpt")
        runs[name]["resumed"] = _load(root / name / "killed" / "checkpoints" / "last.ckpt")
    return runs


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_after_kill_is_exact(resume_runs: dict[str, dict[str, Any]], scenario: str) -> None:
    """Kill -9 mid-epoch, resume from last.ckpt: weights and optimizer state equal bit for bit.

    ``adversarial`` adds mixed FGSM-RS adversarial training (a random start drawn inside every step, with dropout on)
    and a DataLoader worker process.
    """
    run = resume_runs[scenario]
    _, kill_at, saved_at = SCENARIOS[scenario]
    assert run["exit"] == -signal.SIGKILL and run["resume_exit"] == 0
    killed_at = run["killed_at"]
    assert killed_at is not None, "no last.ckpt before the kill"
    assert killed_at["global_step"] == saved_at
    assert killed_at["global_step"] % STEPS_PER_EPOCH != 0  # a mid-epoch (step) checkpoint
    assert saved_at == kill_at - kill_at % EVERY_N_STEPS
    full, resumed = run["full"], run["resumed"]
    assert full["global_step"] == resumed["global_step"] == MAX_EPOCHS * STEPS_PER_EPOCH
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    different = [k for k, v in full["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not different, f"weights differ after the resume: {different[:5]}"
    for a, b in zip(full["optimizer_states"], resumed["optimizer_states"], strict=True):
        for index, state in a["state"].items():
            assert all(torch.equal(state[key], b["state"][index][key]) for key in state)


def test_finished_run_leaves_last_ckpt_at_the_end(resume_runs: dict[str, dict[str, Any]]) -> None:
    """Step checkpoints do not leave last.ckpt behind the final epoch's end either."""
    for run in resume_runs.values():
        assert (run["full"]["epoch"], run["full"]["global_step"]) == (MAX_EPOCHS - 1, MAX_EPOCHS * STEPS_PER_EPOCH)
